# Copyright (c) mmcbn contributors. All rights reserved.
"""Windows over time: what a CBN layer's window holds when its producer
changes, after ``reset_window()``, and when a layer is called a varying
number of times per iteration (call positions that appear and disappear).

Two kinds of checks:

- explicit windows: identity 1x1 convs that never change (trainable, so
  bound, but not stepped: compensation is exactly zero) feed batches whose
  channel means identify their iteration and call position; the mean and
  variance the layer normalized with, read back from its output, say which
  entries it used;
- SGD trajectories in float64 against the independent reference
  (``reference_cbn.py``), with the reference reset or given the iteration
  at the same points.
"""
import copy

import torch
from torch import nn

from mmcbn import CBN2d, set_cbn_iteration
from reference_cbn import ReferenceCBN
from test_window_rules import EPS, assert_uses, batch_of, used_statistics


def identity_conv():
    conv = nn.Conv2d(2, 2, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
    return conv


def new_layer(window):
    return CBN2d(2, window=window, eps=EPS).double()


def test_producer_change_restarts_the_window():
    """Entries recorded behind another producer do not apply: a change of
    producer empties the window, also when the first one comes back."""
    a, b = identity_conv(), identity_conv()
    layer = new_layer(window=4)
    feeds = {0: a, 1: a, 2: a, 3: a, 4: b, 5: b, 6: a, 7: a, 8: a, 9: a,
             10: a}
    seen = {}
    for it, conv in feeds.items():
        set_cbn_iteration(layer, it)
        x = batch_of(it)
        y = layer(conv(x))
        seen[it] = used_statistics(x, y.detach())
        assert layer.bindings[0].status == 'bound'
    expected = {3: [0, 1, 2, 3], 4: [4], 5: [4, 5], 6: [6], 7: [6, 7],
                9: [6, 7, 8, 9], 10: [7, 8, 9, 10]}
    for t, used in expected.items():
        assert_uses(seen, t, used)


def test_reset_window_empties_the_window():
    conv = identity_conv()
    layer = new_layer(window=3)
    seen = {}
    for it in range(8):
        if it == 4:
            layer.reset_window()
        set_cbn_iteration(layer, it)
        x = batch_of(it)
        seen[it] = used_statistics(x, layer(conv(x)).detach())
    for t, used in {3: [1, 2, 3], 4: [4], 5: [4, 5], 6: [4, 5, 6],
                    7: [5, 6, 7]}.items():
        assert_uses(seen, t, used)
    assert sorted(layer._windows[0].iterations) == [6, 7]


#: Calls per iteration of a head shared over levels (e.g. images without
#: some levels, or a varying number of refinement stages).
CALLS = [3, 2, 3, 1, 3, 3, 2, 3, 1, 1, 3]


def level_batch(it, position, images=2):
    """Batch of call ``position`` at ``it``: means identify both."""
    return batch_of(it + 20 * position, images)


def test_call_positions_that_appear_and_disappear():
    """Position p at iteration t uses the entries of position p at
    iterations t-1 .. t-(k-1) that had a p-th call, and no other
    position's."""
    conv = identity_conv()
    layer = new_layer(window=3)
    seen = {}
    for it, calls in enumerate(CALLS):
        set_cbn_iteration(layer, it)
        for p in range(calls):
            x = level_batch(it, p)
            seen[(it, p)] = used_statistics(x, layer(conv(x)).detach())

    def uses(it, p, iterations):
        assert_uses({0: seen[(it, p)]}, 0,
                    [s + 20 * p for s in iterations])

    uses(2, 2, [0, 2])  # iteration 1 had no third call
    uses(4, 1, [2, 4])  # iteration 3 had no second call
    uses(4, 2, [2, 4])
    uses(5, 2, [4, 5])
    uses(3, 0, [1, 2, 3])
    uses(7, 2, [5, 7])  # 6 had two calls
    uses(9, 0, [7, 8, 9])
    uses(10, 2, [10])  # no third call at 8 or 9: a new start
    uses(10, 1, [10])
    assert len(layer._windows) == 3


# ------------------------------------------------------- SGD trajectories
class Shared(nn.Module):
    """One conv + norm applied to every level (RetinaNet-like head)."""

    def __init__(self, conv, norm):
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, levels):
        return [self.norm(self.conv(x)) for x in levels]


def shared_pair(window):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    ours = Shared(conv, CBN2d(5, window=window)).double()
    ref_conv = copy.deepcopy(ours.conv)
    ref = ReferenceCBN(ref_conv, 5, window=window).double()
    return ours, ref


def levels_of(it, calls):
    gen = torch.Generator().manual_seed(it)
    return [
        torch.randn(2, 3, 8 >> p, 8 >> p, generator=gen,
                    dtype=torch.float64) * (1 + p) + 0.1 * it
        for p in range(calls)
    ]


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def loss_of(outs):
    return sum((o**2 * torch.linspace(0, 1, o.numel(), dtype=o.dtype)
                .view_as(o)).sum() + torch.sin(3 * o).mean() for o in outs)


def train_step(*pairs):
    """One SGD step of each ``(optimizer, outputs)`` pair on ``loss_of``."""
    for opt, outs in pairs:
        opt.zero_grad()
        loss_of(outs).backward()
        opt.step()


def test_varying_calls_per_iteration_match_reference():
    ours, ref = shared_pair(window=4)
    opt_ours = sgd(ours.parameters())
    opt_ref = sgd(ref.parameters())
    ref_outputs = {}
    for it, calls in enumerate(CALLS):
        levels = levels_of(it, calls)
        set_cbn_iteration(ours, it)
        ref.start_iteration(it)
        out_ours = ours(levels)
        out_ref = [ref(x) for x in levels]
        for p, (a, b) in enumerate(zip(out_ours, out_ref)):
            torch.testing.assert_close(
                a, b, rtol=1e-9, atol=1e-9,
                msg=lambda m: f'iteration {it}, call {p}: {m}')
            ref_outputs[(it, p)] = b.detach()
        train_step((opt_ours, out_ours), (opt_ref, out_ref))
    torch.testing.assert_close(ours.norm.running_var, ref.running_var,
                               rtol=1e-9, atol=1e-9)
    assert len(ours.norm._windows) == max(CALLS)
    # one window over all calls (the trap) would differ (the test can fail)
    trapped, _ = shared_pair(window=4)
    opt = sgd(trapped.parameters())
    for it, calls in enumerate(CALLS[:4]):
        outs = trapped(levels_of(it, calls))
        train_step((opt, outs))
    assert (outs[0] - ref_outputs[(3, 0)]).abs().max() > 1e-3


def test_reset_window_matches_reference_reset():
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1),
                         CBN2d(5, window=4)).double()
    ref = ReferenceCBN(copy.deepcopy(ours[0]), 5, window=4).double()
    opt_ours, opt_ref = sgd(ours.parameters()), sgd(ref.parameters())
    for it in range(10):
        if it == 5:
            ours[1].reset_window()
            ref.reset()
        x = levels_of(it, 1)[0]
        a, b = ours(x), ref(x)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9,
                                   msg=lambda m: f'iteration {it}: {m}')
        train_step((opt_ours, [a]), (opt_ref, [b]))


def test_producer_change_matches_reference_restart():
    """Trained producers: after the switch to B the layer equals a fresh
    reference window behind B; back to A, a fresh one behind A."""
    torch.manual_seed(0)
    a = nn.Conv2d(3, 5, 3, padding=1).double()
    b = nn.Conv2d(3, 5, 3, padding=1).double()
    norm = CBN2d(5, window=3).double()
    refs = {}
    schedule = ['a'] * 4 + ['b'] * 3 + ['a'] * 4
    ref_convs = {'a': copy.deepcopy(a), 'b': copy.deepcopy(b)}
    opt = sgd(list(a.parameters()) + list(b.parameters()) +
              list(norm.parameters()))
    ref_norm_params = [nn.Parameter(p.detach().clone())
                       for p in norm.parameters()]
    opt_ref = sgd(list(ref_convs['a'].parameters()) +
                  list(ref_convs['b'].parameters()) + ref_norm_params)
    previous = None
    for it, name in enumerate(schedule):
        conv = a if name == 'a' else b
        x = levels_of(it, 1)[0]
        if name != previous:  # a fresh reference window at each change
            refs[name] = ReferenceCBN(ref_convs[name], 5, window=3).double()
            refs[name].weight, refs[name].bias = ref_norm_params
            refs[name].iteration = it - 1
            previous = name
        set_cbn_iteration(norm, it)
        out = norm(conv(x))
        out_ref = refs[name](x)
        torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-9,
                                   msg=lambda m: f'iteration {it}: {m}')
        train_step((opt, [out]), (opt_ref, [out_ref]))
