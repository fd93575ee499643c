# Copyright (c) mmcbn contributors. All rights reserved.
"""The window gradient (``window_grad=True``, method note "Gradients").

The compensated past entries are first-order functions of the producer's
current parameters; with the window rule the gradient flows through them.
Exactness against the float64 jvp reference is checked along SGD
trajectories in ``test_reference_trajectory.py`` (both rules, every
producer kind); this file checks what the rule is for:

- the layer is again invariant to a shift of its producer's output (a conv
  bias that feeds CBN gets no gradient, up to the Taylor model's residual,
  which vanishes with the step size) and to its scale (the weight gradient
  loses its radial component), where the authors' rule is not;
- the repair ``max(nu, mu^2)`` and the naive-values control are exact;
- SyncCBN in 2 gloo processes equals CBN on the gathered batch with either
  rule, the step makes no host synchronization, and activation
  checkpointing is unaffected.
"""
import copy

import pytest
import torch
from torch import nn

from dist_utils import run_and_load
from mmcbn import CBN1d, CBN2d, SyncCBN2d
from reference_cbn import ReferenceCBN
from sync_counter import SyncCounter
from test_sync_cbn import build as sync_build
from test_sync_cbn import train as sync_train


def two_layers(bias=True, window=4, burnin=4, seed=0, **kw):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), CBN2d(8, window=window,
                                             burnin=burnin, **kw),
        nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1, bias=bias),
        CBN2d(6, window=window, burnin=burnin, **kw)).double()


def batch(gen):
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    coef = torch.randn(2, 6, 8, 8, generator=gen, dtype=torch.float64)
    return x, coef


def loss_of(y, coef):
    return (y * coef).mean() + 0.1 * torch.sin(2 * y).mean()


def trained(lr, bias=True, steps=12, frozen_weight=False, **kw):
    """A two-layer model after ``steps`` SGD steps (burn-in 4, window 4),
    and the next batch."""
    model = two_layers(bias=bias, **kw)
    model[3].weight.requires_grad_(not frozen_weight)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, coef = batch(gen)
        opt.zero_grad()
        loss_of(model(x), coef).backward()
        opt.step()
    return model, batch(gen)


def gradients_under(model, data, window_grad):
    """The parameter gradients of one more step, under one rule (on a
    copy: the window state is copied with the model)."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, CBN2d):
            m.window_grad = window_grad
    loss_of(twin(data[0]), data[1]).backward()
    assert twin[4].bindings[0].status == 'bound'
    assert len(twin[4]._windows[0]) == 3
    return twin


def test_conv_bias_gets_no_gradient_with_the_window_rule():
    """As with BN (zero there): at most 1e-3 of the authors' rule's, after
    burn-in, and shrinking with the step size (a second-order residual of
    the Taylor model); exactly zero while the weights have not moved."""
    ratios = {}
    for lr in (1e-2, 1e-3):
        model, data = trained(lr)
        window = gradients_under(model, data, True)
        authors = gradients_under(model, data, False)
        ratios[lr] = [
            (window[i].bias.grad.norm() / authors[i].bias.grad.norm()).item()
            for i in (0, 3)
        ]
        assert authors[3].bias.grad.norm() > 1e-3  # the test can fail
    assert max(ratios[1e-3]) <= 1e-3, ratios
    assert all(a > 5 * b for a, b in zip(ratios[1e-2], ratios[1e-3])), ratios
    # weights unchanged since the entries were recorded: exactly invariant
    model, data = trained(0.0)
    window = gradients_under(model, data, True)
    authors = gradients_under(model, data, False)
    for i in (0, 3):
        assert window[i].bias.grad.abs().max() < 1e-12
        assert authors[i].bias.grad.abs().max() > 1e-3


def cosine(w, g):
    return (w * g).sum().abs() / (w.norm() * g.norm())


@pytest.mark.parametrize('lr', [1e-2, 1e-3])
def test_weight_gradient_loses_its_radial_component(lr):
    """BN makes a layer invariant to the scale of its producer's weight, so
    ``W . dL/dW = 0``; with the window rule the cosine between W and its
    gradient is at least 10x smaller than with the authors' rule."""
    model, data = trained(lr, bias=False)
    window = gradients_under(model, data, True)
    authors = gradients_under(model, data, False)
    cos_window = cosine(window[3].weight, window[3].weight.grad)
    cos_authors = cosine(authors[3].weight, authors[3].weight.grad)
    assert cos_authors > 1e-3
    assert cos_window * 10 <= cos_authors, (cos_window, cos_authors)


def test_the_rules_change_the_trajectory():
    """The option is not a no-op: outputs differ after burn-in only."""
    outs = {}
    for rule in (True, False):
        model = two_layers(window_grad=rule)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(1)
        outs[rule] = []
        for _ in range(10):
            x, coef = batch(gen)
            y = model(x)
            opt.zero_grad()
            loss_of(y, coef).backward()
            opt.step()
            outs[rule].append(y.detach())
    for step, (a, b) in enumerate(zip(outs[True], outs[False])):
        if step <= 4:  # burn-in, and the first window step (same weights)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (outs[True][-1] - outs[False][-1]).abs().max() > 1e-4


@pytest.mark.parametrize('compensate', [True, False])
@pytest.mark.parametrize('groups,bias', [(1, True), (2, False)])
def test_repair_branch_matches_the_reference(compensate, groups, bias):
    """A large weight change makes some compensated ``nu < mu^2``: the
    gradient through ``max(nu, mu^2)`` (and, with ``compensate=False``,
    the naive values with the window gradient) matches autograd through
    the jvp reference."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=bias).double()
    ours = CBN2d(6, window=3, compensate=compensate,
                 window_grad=True).double()
    ref_conv = copy.deepcopy(conv)
    ref = ReferenceCBN(ref_conv, 6, window=3, compensate=compensate,
                       window_grad=True).double()
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64)
          for _ in range(3)]
    for x in xs[:2]:
        ours(conv(x))
        ref(x)
    with torch.no_grad():
        for c in (conv, ref_conv):
            c.weight.mul_(-0.3).add_(0.2)
    y, y_ref = ours(conv(xs[2])), ref(xs[2])
    coef = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    loss_of(y, coef).backward()
    loss_of(y_ref, coef).backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    for p, q in zip(conv.parameters(), ref_conv.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9)
    if compensate:
        # the repair was active for some entry and channel
        state = ours._windows[0]
        hist = state.compensated(3, 2, ours.bindings[0].key, conv.weight,
                                 conv.bias)
        assert (hist.var < 0).any()


def test_naive_values_with_the_window_gradient():
    """``compensate=False, window_grad=True``: the forward is naive CBN's,
    only the gradient differs."""
    naive = two_layers(compensate=False)
    control = two_layers(compensate=False, window_grad=True)
    assert not naive[1].window_grad and control[1].window_grad
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):  # same weights: no optimizer step
        x, coef = batch(gen)
        y_naive, y_control = naive(x), control(x)
        torch.testing.assert_close(y_naive, y_control, rtol=0, atol=0)
        loss_of(y_naive, coef).backward()
        loss_of(y_control, coef).backward()
    assert (naive[3].weight.grad - control[3].weight.grad).abs().max() > 1e-4


def test_frozen_weight_trainable_bias_gets_only_the_bias_gradient():
    model, data = trained(1e-2, frozen_weight=True)
    window = gradients_under(model, data, True)
    assert window[3].weight.grad is None
    assert window[3].bias.grad is not None
    authors = gradients_under(model, data, False)
    assert window[3].bias.grad.norm() < 0.1 * authors[3].bias.grad.norm()


def test_linear_producer_and_affine_false():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4).double()
    ref_lin = copy.deepcopy(lin)
    ours = CBN1d(4, window=3, affine=False).double()
    ref = ReferenceCBN(ref_lin, 4, window=3, affine=False).double()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref_lin.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
        for y, o in ((ours(lin(x)), opt), (ref(x), ref_opt)):
            o.zero_grad()
            (y.sin() * torch.arange(4.).double()).sum().backward()
            o.step()
    for p, q in zip(lin.parameters(), ref_lin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('kw', [
    dict(window=4),
    dict(window=4, window_grad=False),
    dict(window=4, compensate=False, window_grad=True),
    dict(window=4, moment_stride=2, store_dtype='bfloat16'),
    dict(window=4, compensate='upstream'),
    dict(window=4, compensate='upstream', window_grad=False),
])
def test_training_step_makes_no_host_synchronization(kw):
    model = two_layers(burnin=2, **kw).float()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for it in range(8):
        x, coef = batch(gen)
        x, coef = x.float(), coef.float()
        if it == 7:
            with SyncCounter() as counter:
                loss = loss_of(model(x), coef)
                opt.zero_grad()
                loss.backward()
            assert counter.total == 0, dict(counter.ops)
        else:
            opt.zero_grad()
            loss_of(model(x), coef).backward()
        opt.step()
    assert len(model[4]._windows[0]) == 3


@pytest.mark.parametrize('compensate', [True, 'upstream'])
@pytest.mark.parametrize('reentrant', [True, False])
def test_activation_checkpointing_is_the_same_under_both_rules(
        reentrant, compensate):
    """Under checkpointing a layer cannot bind (it is BN): the rules agree,
    and nothing fails in the recomputation."""
    import torch.utils.checkpoint as cp
    grads = {}
    for rule in (True, False):
        model = two_layers(burnin=0, window_grad=rule, compensate=compensate)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            x, coef = batch(gen)
            y = cp.checkpoint(model, x.requires_grad_(),
                              use_reentrant=reentrant)
            model.zero_grad()
            loss_of(y, coef).backward()
        grads[rule] = [p.grad.clone() for p in model.parameters()]
        assert model[4].bindings[0].status == 'unbound'
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_option_names_the_value():
    with pytest.raises(ValueError, match="window_grad.*'yes'"):
        CBN2d(4, window_grad='yes')
    assert 'window_grad=False' in repr(CBN2d(4, window_grad=False))
    assert 'window_grad' not in repr(CBN2d(4))
    assert 'window_grad' not in repr(CBN2d(4, compensate=False))
    assert CBN2d(4).window_grad is True
    assert CBN2d(4, compensate=False).window_grad is False


def test_config_path():
    cnn = pytest.importorskip('mmcv.cnn')
    _, layer = cnn.build_norm_layer(dict(type='CBN', window_grad=False), 4)
    assert layer.window_grad is False
    _, layer = cnn.build_norm_layer(dict(type='SyncCBN'), 4)
    assert layer.window_grad is True


# ------------------------------------------------------- two processes
SYNC_CASES = [
    dict(batches=(1, 3), window=4, window_grad=False),
    dict(batches=(3, 0), window=4, window_grad=True),
    dict(batches=(2, 2), window=3, compensate=False, window_grad=True),
    # upstream compensation: n2's entries also follow n1's change
    dict(batches=(1, 3), window=4, compensate='upstream', window_grad=True,
         upstream_form='exact'),
    dict(batches=(3, 0), window=3, compensate='upstream',
         window_grad=False, upstream_form='exact'),
    # the fast form where one process holds the whole batch (elsewhere
    # each process approximates about its own batch)
    dict(batches=(3, 0), window=3, compensate='upstream', window_grad=True,
         upstream_form='fast'),
]


def _sync_worker(rank, world, out_dir):
    import os.path as osp
    from torch.nn.parallel import DistributedDataParallel as DDP
    results = []
    for case in SYNC_CASES:
        model = sync_build(case, sync=True)
        outputs = sync_train(DDP(model, broadcast_buffers=False), case, rank,
                             world)
        results.append(dict(outputs=outputs, state=model.state_dict()))
    torch.save(results, osp.join(out_dir, f'rank{rank}.pt'))


@pytest.fixture(scope='module')
def sync_results(tmp_path_factory):
    return run_and_load(_sync_worker, tmp_path_factory.mktemp('wgrad'))


@pytest.mark.parametrize('index', range(len(SYNC_CASES)))
def test_sync_cbn_equals_cbn_on_the_gathered_batch(sync_results, index):
    """Each process sends the window gradient of its own entries, weighted
    by its share of each combined entry: the sum over processes is the
    gathered batch's (unequal and empty ranks)."""
    case = SYNC_CASES[index]
    reference = sync_build(case, sync=False)
    ref_out = sync_train(reference, case, world=2)
    ranks = [r[index] for r in sync_results]
    for step, ref in enumerate(ref_out):
        got = torch.cat([ranks[0]['outputs'][step],
                         ranks[1]['outputs'][step]])
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-9,
                                   msg=lambda m: f'step {step}: {m}')
    for name, value in reference.state_dict().items():
        for rank in ranks:
            torch.testing.assert_close(rank['state'][name], value,
                                       rtol=1e-8, atol=1e-9,
                                       msg=lambda m: f'{name}: {m}')
    # and the other rule gives another trajectory (the test can fail)
    other = dict(case, window_grad=not case['window_grad'])
    other_out = sync_train(sync_build(other, sync=False), other, world=2)
    assert (other_out[-1] - ref_out[-1]).abs().max() > 1e-5
