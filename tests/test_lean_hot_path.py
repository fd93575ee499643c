# Copyright (c) mmcbn contributors. All rights reserved.
"""The pieces of the lean hot path (issue 18), each against a plain
reference written here:

- the three-op finiteness checks (``finite_rows``, ``all_finite``) against
  ``torch.isfinite``, for every kind of non-finite value in every position;
- the window layouts built from the host's iteration numbers against the
  lag matching the device used to do (``lag == t - s``), for random ring
  states (hypothesis), and their reuse: a full ring in steady state builds
  no device tensor after one pass;
- a record's patch mean and moment gradient from one weight-gradient call
  against the two separate calls, for every kind of convolution;
- the record's per-channel block: views of one tensor that stay linked
  through copies, pickles and loads (writes reach every view);
- a window saved by the earlier format (slots' iterations and cycles also
  on the device) loads and is used as it was.
"""
import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mmcbn import CBN2d, set_cbn_iteration
from mmcbn.binding import find_producer
from mmcbn.window import WindowState, all_finite, finite_rows

BAD = (float('nan'), float('inf'), float('-inf'))


# ------------------------------------------------------------ finite checks
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_finite_rows_sees_every_non_finite_value(dtype):
    rows, cols = 3, 5
    base = torch.randn(rows, cols, dtype=dtype)
    assert finite_rows(base).tolist() == [True] * rows
    for bad in BAD:
        for r in range(rows):
            for c in range(cols):
                t = base.clone()
                t[r, c] = bad
                assert finite_rows(t).tolist() == \
                    torch.isfinite(t).all(1).tolist(), (bad, r, c)
    # the input is not modified (the check works on its row sums)
    before = base.clone()
    finite_rows(base)
    assert torch.equal(base, before)


def test_all_finite_over_several_tensors():
    a, b = torch.randn(4), torch.randn(4)
    assert bool(all_finite(a)) and bool(all_finite(a, b))
    assert bool(all_finite(a, torch.randn(2, 3)))  # other shapes
    for bad in BAD:
        for which in range(2):
            for index in range(4):
                pair = [a.clone(), b.clone()]
                pair[which][index] = bad
                assert not bool(all_finite(*pair)), (bad, which, index)
                assert not bool(all_finite(pair[which], torch.randn(2, 3)))
    # +inf in one and -inf in the other: their sum is NaN, still caught
    assert not bool(all_finite(torch.tensor([float('inf')]),
                               torch.tensor([float('-inf')])))


# ------------------------------------------------------------------ layouts
def _state(iterations, cycles):
    """A window whose host bookkeeping says ``iterations`` (device buffers
    of the right size, contents irrelevant here)."""
    state = WindowState(len(iterations))
    state.iterations = list(iterations)
    state.cycles = list(cycles)
    state._buffers = {'count': torch.zeros(len(iterations))}
    return state


def _reference_layout(iterations, cycles, t, lags, cycle):
    """What the device computed before: lag = t - iteration, matched to
    1 .. lags; exact where the slot's cycle is the current one."""
    slots = len(iterations)
    match = torch.zeros(lags, slots)
    in_window = torch.zeros(slots, dtype=torch.bool)
    exact = torch.zeros(slots, 1, dtype=torch.bool)
    for s, (it, cy) in enumerate(zip(iterations, cycles)):
        if it is None:
            continue
        lag = t - it
        if 1 <= lag <= lags:
            match[lag - 1, s] = 1
            in_window[s] = True
            exact[s] = cycle is not None and cy == cycle
    return match, in_window, exact


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_layout_matches_the_lags_and_cycles(data):
    slots = data.draw(st.integers(1, 8))
    t = data.draw(st.integers(12, 40))
    # distinct iterations, the current one included (a repeated call)
    distinct = data.draw(
        st.lists(st.integers(t - 12, t), min_size=slots, max_size=slots,
                 unique=True))
    iterations = [
        None if data.draw(st.booleans()) and i % 3 == 0 else it
        for i, it in enumerate(distinct)
    ]
    cycle_length = data.draw(st.integers(1, 4))
    cycles = [None if it is None else it // cycle_length
              for it in iterations]
    lags = data.draw(st.integers(1, 10))
    cycle = data.draw(st.sampled_from([None, t // cycle_length]))
    state = _state(iterations, cycles)
    layout = state.layout(t, lags, cycle)
    match, in_window, exact = _reference_layout(iterations, cycles, t, lags,
                                                cycle)
    if not in_window.any():
        assert layout is None
        return
    assert torch.equal(layout.match, match)
    assert torch.equal(layout.in_window, in_window)
    if exact.any():
        assert torch.equal(layout.exact, exact)
    else:
        assert layout.exact is None
    # the same host state gives the same (cached) tensors
    assert state.layout(t, lags, cycle) is layout


def test_a_full_ring_builds_its_layouts_once():
    """Steady state: a ring of S slots cycles through S layouts; after one
    pass over them, no step builds one (no fill op in compensation)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = CBN2d(4, window=5)
    x = torch.randn(2, 3, 5, 5)
    sizes = []
    for it in range(20):
        set_cbn_iteration(layer, it)
        layer(conv(x)).sum().backward()
        sizes.append(len(layer._windows[0]._layouts))
    # filling the ring (capacity - 1 layouts), then one per slot; then
    # none more
    assert sizes[-10:] == [2 * layer.capacity - 1] * 10
    # a reset forgets them with the entries
    layer.reset_window()
    assert layer._windows[0]._layouts == {}


# ------------------------------------------------- a record's derivatives
CONVS = {
    '3x3': dict(in_channels=3, out_channels=4, kernel_size=3, padding=1),
    'stride 2': dict(in_channels=3, out_channels=4, kernel_size=3,
                     stride=2, padding=1),
    'dilation 2': dict(in_channels=3, out_channels=5, kernel_size=3,
                       dilation=2, padding=2),
    '1x1 padded': dict(in_channels=3, out_channels=4, kernel_size=1,
                       padding=1),
    '5x3 no padding': dict(in_channels=2, out_channels=3,
                           kernel_size=(5, 3)),
}


@pytest.mark.parametrize('kind', sorted(CONVS))
def test_one_weight_gradient_call_gives_both_derivatives(kind):
    """The fused call (x - mean in C channels, a constant in one more)
    equals :meth:`patch_mean` and :meth:`moment_weight_grad` called apart."""
    torch.manual_seed(1)
    conv = nn.Conv2d(**CONVS[kind]).double()
    x = conv(torch.randn(3, conv.in_channels, 7, 6, dtype=torch.float64))
    prod = find_producer(x).producer
    y = x.detach()
    mean = y.mean((0, 2, 3))
    fused = prod.mean_and_moment_grads(y, mean)
    assert fused is not None
    pbar, grad = fused
    torch.testing.assert_close(pbar, prod.patch_mean(y), rtol=1e-12,
                               atol=1e-14)
    centered = y - mean.view(1, -1, 1, 1)
    torch.testing.assert_close(grad, prod.moment_weight_grad(centered),
                               rtol=1e-12, atol=1e-14)


def test_fused_derivatives_only_where_they_save_a_call():
    torch.manual_seed(2)
    cases = {
        'grouped': nn.Conv2d(4, 4, 3, padding=1, groups=2),
        '1x1': nn.Conv2d(4, 4, 1),
        'linear': nn.Linear(4, 4),
    }
    for name, module in cases.items():
        inp = torch.randn(2, 4, 3, 3) if name != 'linear' else \
            torch.randn(6, 4)
        x = module(inp)
        prod = find_producer(x).producer
        y = x.detach()
        dims = (0, 2, 3) if y.dim() == 4 else (0, )
        assert prod.mean_and_moment_grads(y, y.mean(dims)) is None, name


# ------------------------------------------------- the per-channel block
def _trained(window=4, steps=6):
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = CBN2d(4, window=window)
    model = nn.Sequential(conv, layer)
    for it in range(steps):
        set_cbn_iteration(model, it)
        model(torch.randn(2, 3, 5, 5)).sum().backward()
    return model


def _linked(state):
    """Every per-channel buffer is a view of the block."""
    names = ('raw_mean', 'raw_var', 'a_mean', 'a_var')
    base = state._small
    return all(state._buffers[n].data_ptr() ==
               base[:, i].data_ptr() and
               state._buffers[n].untyped_storage().data_ptr() ==
               base.untyped_storage().data_ptr()
               for i, n in enumerate(names))


@pytest.mark.parametrize('copier', [
    copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))
])
def test_copies_keep_the_block_linked(copier):
    model = _trained()
    copied = copier(model)
    state = copied[1]._windows[0]
    assert _linked(state)
    # a push writes through the block: the views see it
    set_cbn_iteration(copied, 6)
    copied(torch.randn(2, 3, 5, 5)).sum().backward()
    slot = state.iterations.index(6)
    assert torch.equal(state._buffers['raw_mean'][slot],
                       state._small[slot, 0])
    assert state._buffers['count'][slot] == 50


def test_a_window_of_the_earlier_format_loads_and_is_used_alike():
    """Windows saved before the layouts moved to the host held the slots'
    iterations and cycles as device buffers too (and no ``cycles``), and
    a usable flag per slot where a count of 0 says it now."""
    model = _trained()
    state = model[1]._windows[0]
    saved = state.state_dict()
    old = dict(saved, buffers=dict(saved['buffers']))
    del old['cycles']
    old['buffers']['iteration'] = torch.tensor(
        [-(1 << 62) if it is None else it for it in saved['iterations']])
    old['buffers']['cycle'] = old['buffers']['iteration'].clone()
    old['buffers']['ok'] = torch.ones(state.capacity, dtype=torch.bool)
    fresh = WindowState(state.capacity)
    fresh.load_state_dict(old, torch.device('cpu'))
    assert fresh.cycles == state.cycles
    assert set(fresh._buffers) == set(state._buffers)
    assert _linked(fresh)
    fresh.key = state.key
    weight, bias = model[0].weight, model[0].bias
    ours = state.compensated(6, 3, state.key, weight, bias, cycle=6)
    theirs = fresh.compensated(6, 3, state.key, weight, bias, cycle=6)
    for a, b in zip(ours[:6], theirs[:6]):
        assert torch.equal(a, b)
    # an entry the old format flagged unusable is left out as one of 0
    # samples (the old push stored its statistics as zeros)
    slot = state.iterations.index(4)
    old['buffers']['ok'][slot] = False
    fresh.load_state_dict(old, torch.device('cpu'))
    count = saved['buffers']['count'].clone()
    count[slot] = 0
    assert torch.equal(fresh._buffers['count'], count)
    assert count.count_nonzero() == state.capacity - 1


# ------------------------------------------------------ burn-in records
@pytest.mark.parametrize('case', [
    dict(window=4, burnin=9),
    dict(window=3, burnin=2, window_grad=False),
    dict(window=4, burnin=7, cycle=(2, True)),  # window counted in cycles
    dict(window=3, burnin=6, cycle=(3, False)),
    dict(window=4, burnin=5, compensate='upstream'),
])
def test_recording_only_the_end_of_burn_in_changes_nothing(case):
    """Burn-in records only its last ``capacity`` iterations: a run equals
    the one that records every burn-in iteration (``record_burnin``),
    through burn-in and after it, with gradient accumulation and with the
    upstream compensation (in float64, to rounding: the same entries sit
    in other slots of the ring, so sums over the slots run in another
    order)."""
    case = dict(case)
    cycle = case.pop('cycle', None)
    runs = []
    for record_all in (False, True):
        torch.manual_seed(4)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), CBN2d(4, **case), nn.ReLU(),
            nn.Conv2d(4, 5, 3, padding=1), CBN2d(5, **case)).double()
        for m in model:
            if isinstance(m, CBN2d):
                m.record_burnin = record_all
                if cycle is not None:
                    m.set_accumulation(*cycle)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(5)
        outs = []
        recorded = []
        for it in range(case['burnin'] + 3 * case['window']):
            set_cbn_iteration(model, it)
            y = model(torch.randn(2, 3, 5, 5, generator=gen,
                                  dtype=torch.float64))
            (y * torch.arange(y.numel()).view_as(y)).mean().backward()
            opt.step()
            opt.zero_grad()
            outs.append(y.detach())
            recorded.append(len(model[1]._windows[0]))
        runs.append((outs, [p.detach() for p in model.parameters()],
                     recorded))
    (outs, params, recorded), (outs_all, params_all, recorded_all) = runs
    for a, b in zip(outs + params, outs_all + params_all):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the default run skipped records early in burn-in (where there are
    # more burn-in iterations than the window holds)
    capacity = len(model[1]._windows[0].iterations)
    if case['burnin'] > capacity:
        assert recorded[0] == 0 and recorded_all[0] == 1
    assert recorded[-1] == recorded_all[-1] == capacity
