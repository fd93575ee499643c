# Copyright (c) mmcbn contributors. All rights reserved.
"""Fault injection: NaN/Inf in the input, in a producer's weight, or in the
gradient, at a seeded random iteration (issue 11, "Fault injection").

Training runs with ``torch.amp.GradScaler`` semantics: a step whose
gradients are not finite is skipped. After every iteration, no CBN layer
may hold a non-finite value in its running statistics or in any window
entry; once the input is finite again the outputs are finite within at
most ``window`` iterations. With the runner's iteration given
(``set_cbn_iteration``) the fault must leave no trace at all: the run then
equals a twin that skipped the faulty iteration (input and first-weight
faults) or its optimizer step (gradient faults). The events are counted on
the device and reported by :func:`mmcbn.read_cbn_flags`, with one warning
per layer and kind of event.
"""
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmcbn import (CBN1d, CBN2d, SyncCBN1d, SyncCBN2d, cbn_layers,
                   name_cbn_layers, read_cbn_flags, set_cbn_iteration)

KINDS = ('input_nan', 'input_inf', 'weight_nan', 'weight_inf', 'grad_nan',
         'grad_inf')
SEEDS = range(4)
BAD = {'nan': float('nan'), 'inf': float('inf')}


class Net(nn.Module):
    """conv (bias) -> grouped strided conv (no bias) -> linear, each
    followed by a CBN layer."""

    def __init__(self, sync=False, **kw):
        super().__init__()
        norm2d, norm1d = (SyncCBN2d, SyncCBN1d) if sync else (CBN2d, CBN1d)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.n1 = norm2d(8, **kw)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2,
                            bias=False)
        self.n2 = norm2d(8, **kw)
        self.fc = nn.Linear(8, 6)
        self.n3 = norm1d(6, **kw)

    def forward(self, x):
        x = F.relu(self.n1(self.c1(x)))
        x = F.relu(self.n2(self.c2(x)))
        return self.n3(self.fc(x.mean((2, 3))))


def scenario(kind, seed):
    """The seeded random part of a fault run."""
    rng = random.Random(f'{kind}-{seed}')
    window = rng.choice([2, 3, 4, 6])
    burnin = rng.choice([0, 0, 2, 5])
    return dict(
        kind=kind,
        window=window,
        burnin=burnin,
        fault=rng.randrange(1, burnin + window + 3),
        producer=rng.choice(['c1', 'c2', 'fc']),
        compensate=rng.random() < 0.75,
        running_stats_from=rng.choice(['batch', 'window']),
        sync=rng.random() < 0.5,
        store_dtype=rng.choice([None, None, 'bfloat16']),
        moment_stride=rng.choice([1, 1, 2]),
        element=rng.randrange(1 << 20))


def build(sc):
    torch.manual_seed(0)
    model = Net(sc['sync'], window=sc['window'], burnin=sc['burnin'],
                compensate=sc['compensate'],
                running_stats_from=sc['running_stats_from'],
                store_dtype=sc.get('store_dtype'),
                moment_stride=sc.get('moment_stride', 1))
    name_cbn_layers(model)
    return model


def batches(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 3, 8, 8, generator=gen) * 1.5 + 0.3
            for _ in range(steps)]


def loss_of(y):
    return (y * torch.linspace(-1, 1, y.shape[1])).sum() + (y**2).mean()


def put(tensor, element, value):
    """Set one element (chosen by ``element``) of ``tensor`` in place."""
    with torch.no_grad():
        tensor.view(-1)[element % tensor.numel()] = value


def assert_finite_state(model, where):
    for name, layer in cbn_layers(model):
        for buf in ('running_mean', 'running_var'):
            assert torch.isfinite(getattr(layer, buf)).all(), (where, name,
                                                              buf)
        for position, state in enumerate(layer._windows):
            for key, value in state._buffers.items():
                if value.is_floating_point():
                    assert torch.isfinite(value).all(), (where, name,
                                                         position, key)


def run(model, sc, xs, inject=True, skip=None, step_skip=None,
        hook=True):
    """Train on ``xs`` under GradScaler semantics, injecting the fault of
    ``sc`` at its iteration; ``skip``: an iteration left out entirely,
    ``step_skip``: one whose optimizer step is left out. Checks the layer
    state after every iteration.

    Returns:
        tuple: Outputs per iteration (None where skipped) and the scales.
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    scaler = torch.amp.GradScaler('cpu')
    kind, fault = sc['kind'], sc['fault']
    bad = BAD[kind.split('_')[1]]
    outs, scales = [], []
    for it, x in enumerate(xs):
        if it == skip:
            outs.append(None)
            scales.append(None)
            continue
        if hook:
            set_cbn_iteration(model, it)
        at_fault = inject and it == fault
        x = x.clone()
        if at_fault and kind.startswith('input'):
            put(x, sc['element'], bad)
        saved = None
        if at_fault and kind.startswith('weight'):
            weight = getattr(model, sc['producer']).weight
            saved = weight.detach().clone()
            put(weight, sc['element'], bad)
        y = model(x)
        if at_fault and kind.startswith('grad'):

            def poison(grad):
                grad = grad.clone()
                put(grad, sc['element'], bad)
                return grad

            y.register_hook(poison)
        opt.zero_grad()
        if it == step_skip:
            loss_of(y).backward()  # the twin: same forward, no step
        else:
            scaler.scale(loss_of(y)).backward()
            scaler.step(opt)  # skipped when a gradient is not finite
            scaler.update()
        if saved is not None:
            with torch.no_grad():
                getattr(model, sc['producer']).weight.copy_(saved)
        for p in model.parameters():
            assert torch.isfinite(p).all(), (sc, it)
        assert_finite_state(model, (sc, it))
        outs.append(y.detach())
        scales.append(scaler.get_scale())
    return outs, scales


@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('hook', [True, False])
def test_fault_never_reaches_the_state_and_outputs_recover(kind, seed, hook):
    sc = scenario(kind, seed)
    window, fault = sc['window'], sc['fault']
    steps = fault + window + 3
    model = build(sc)
    outs, scales = run(model, sc, batches(steps), hook=hook)
    # the fault did happen: a non-finite output, or a skipped step
    if kind.startswith('grad'):
        assert scales[fault] < scales[fault - 1], sc
        assert torch.isfinite(outs[fault]).all(), sc
    else:
        assert not torch.isfinite(outs[fault]).all(), sc
    for it in range(fault + window, steps):
        assert torch.isfinite(outs[it]).all(), (sc, it)
    for it in range(fault):
        assert torch.isfinite(outs[it]).all(), (sc, it)
    # the faulty entry has left every window: all entries usable again
    for name, layer in cbn_layers(model):
        state = layer._windows[0]
        assert len(state) == window - 1, (sc, name)
        if window > 1:
            assert bool((state._buffers['count'] > 0).all()), (sc, name)
    flags = read_cbn_flags(model, warn=False)
    if kind.startswith('grad'):
        assert flags == {}, sc  # a bad gradient touches no statistic
    else:
        assert flags, sc
        for counts in flags.values():
            assert counts['skipped'] == 1, (sc, flags)


@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('kind', KINDS)
def test_fault_leaves_no_trace(kind, seed):
    """With the iteration given, the faulty run equals a twin that skipped
    the faulty iteration (or, for a gradient fault, its optimizer step)."""
    sc = scenario(kind, seed)
    if kind.startswith('weight'):
        sc['producer'] = 'c1'  # every layer downstream sees the fault
    steps = sc['fault'] + sc['window'] + 3
    xs = batches(steps)
    model, twin_model = build(sc), build(sc)
    outs, _ = run(model, sc, xs)
    if kind.startswith('grad'):
        twin, _ = run(twin_model, sc, xs, inject=False, step_skip=sc['fault'])
    else:
        twin, _ = run(twin_model, sc, xs, inject=False, skip=sc['fault'])
    # Up to rounding: an unusable entry in the window sends a layer through
    # the window kernels instead of BatchNorm's (the same math), and SGD
    # with momentum amplifies the last bits over the following steps.
    tol = dict(rtol=1e-3, atol=2e-4)
    for it in range(sc['fault'] + 1, steps):
        torch.testing.assert_close(outs[it], twin[it], **tol,
                                   msg=lambda m: f'{sc}, iteration {it}: {m}')
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q, **tol)
    for (name, a), (_, b) in zip(cbn_layers(model), cbn_layers(twin_model)):
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked), name
        torch.testing.assert_close(a.running_mean, b.running_mean, **tol)
        torch.testing.assert_close(a.running_var, b.running_var, **tol)


def test_events_are_counted_and_warned_once_per_layer_and_kind(mmlogs):
    """Two input faults and a weight fault: counted on the device between
    reads, one warning per layer and kind, naming the layer; later events
    are counted silently."""
    sc = dict(kind='input_nan', window=3, burnin=0, fault=-1, producer='c1',
              compensate=True, running_stats_from='batch', sync=False,
              element=5)
    model = build(sc)
    xs = batches(12)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for it, x in enumerate(xs):
        set_cbn_iteration(model, it)
        x = x.clone()
        if it in (4, 5):  # two input faults before one read
            put(x, it, float('nan'))
        saved = model.c1.weight.detach().clone()
        if it == 9:  # entries 8 and 7 are in n1's window, both usable
            put(model.c1.weight, 3, float('inf'))
        y = model(x)
        opt.zero_grad()
        model.c1.weight.data.copy_(saved)
        assert_finite_state(model, it)
        if it == 5:
            assert read_cbn_flags(model) == {
                name: dict(dropped=0, skipped=2, not_stored=2)
                for name in ('n1', 'n2', 'n3')
            }
        if it == 9:
            flags = read_cbn_flags(model)
            assert flags['n1'] == dict(dropped=2, skipped=1, not_stored=1)
            for name in ('n2', 'n3'):
                assert flags[name] == dict(dropped=0, skipped=1,
                                           not_stored=1)
        assert torch.isfinite(y).all() == (it not in (4, 5, 9))
    assert read_cbn_flags(model) == {}  # read and reset
    warnings = [m for m in mmlogs.messages if 'first seen by' in m]
    kinds = {'skipped': 'running statistics were not updated',
             'not_stored': 'were not stored in the window',
             'dropped': 'those window entries were dropped'}
    for name in ('n1', 'n2', 'n3'):
        for kind, text in kinds.items():
            mine = [m for m in warnings
                    if m.startswith(f'{name}: ') and text in m]
            expected = 0 if kind == 'dropped' and name != 'n1' else 1
            assert len(mine) == expected, (name, kind, warnings)
    assert len(warnings) == 7
    # the first read's counts are in the message, the later ones silent
    assert any(m.startswith('n2: the batch statistics were not finite in '
                            '2 training iterations') for m in warnings)
