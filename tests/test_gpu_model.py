# Copyright (c) mmcbn contributors. All rights reserved.
"""The GPU model of execution: a CBN training step never synchronizes.

A ``TorchDispatchMode`` counts, on the CPU, the operators that would stall a
GPU (``.item()``, ``bool(t)``, ``nonzero``, boolean-mask indexing, Python
data turned into tensors, ...) over a whole training step (forward, loss,
backward), with the windows full, inside and after burn-in. CBN must make
none, like BatchNorm.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmcbn import CBN1d, CBN2d, read_cbn_flags, set_cbn_iteration
from sync_counter import SyncCounter


class Net(nn.Module):
    """Conv (bias), grouped conv, frozen conv, linear: every producer
    kind, each followed by a norm layer built by ``norm``."""

    def __init__(self, norm, norm1d):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.n1 = norm(8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2,
                            bias=False)
        self.n2 = norm(8)
        self.c3 = nn.Conv2d(8, 8, 1).requires_grad_(False)
        self.n3 = norm(8)
        self.fc = nn.Linear(8, 6)
        self.n4 = norm1d(6)

    def forward(self, x):
        x = F.relu(self.n1(self.c1(x)))
        x = F.relu(self.n2(self.c2(x)))
        x = self.n3(self.c3(x)) + x
        return self.n4(self.fc(x.mean((2, 3))))


class UpstreamNet(nn.Module):
    """The upstream compensation's paths: n2 is fed by n1 through a
    ReLU, n3 (a 1x1 conv with a stride) by n2 and n1 through a residual
    add and two ReLUs, n4 (linear) by nothing it can follow (a mean)."""

    def __init__(self, norm, norm1d):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.n1 = norm(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.n2 = norm(8)
        self.c3 = nn.Conv2d(8, 8, 1, stride=2)
        self.n3 = norm(8)
        self.fc = nn.Linear(8, 6)
        self.n4 = norm1d(6)

    def forward(self, x):
        h = F.relu(self.n1(self.c1(x)))
        x = F.relu(self.n2(self.c2(h)) + h)
        x = F.relu(self.n3(self.c3(x)))
        return self.n4(self.fc(x.mean((2, 3))))


def step(model, x, opt):
    out = model(x)
    loss = (out**2).mean() + out.mean()
    opt.zero_grad()
    loss.backward()
    return loss


def build(kind, **kw):
    torch.manual_seed(0)
    if kind == 'bn':
        return Net(nn.BatchNorm2d, nn.BatchNorm1d)
    net = UpstreamNet if kw.get('compensate') == 'upstream' else Net
    return net(lambda c: CBN2d(c, **kw), lambda c: CBN1d(c, **kw))


@pytest.mark.parametrize('kind,kw', [
    ('bn', {}),
    ('cbn', dict(window=1)),
    ('cbn', dict(window=2)),
    ('cbn', dict(window=8)),
    ('cbn', dict(window=8, burnin=100)),  # early in burn-in: no record
    ('cbn', dict(window=8, burnin=14)),  # its last iterations record
    ('cbn', dict(window=4, compensate=False)),
    ('cbn', dict(window=4, running_stats_from='window')),
    ('cbn', dict(window=4, momentum=None)),
    ('cbn', dict(window=4, moment_stride=2, store_dtype='bfloat16')),
    ('cbn', dict(window=4, compensate='upstream', upstream_form='exact')),
    ('cbn', dict(window=4, compensate='upstream', upstream_form='fast')),
])
@pytest.mark.parametrize('hook', [False, True])
def test_training_step_makes_no_host_synchronization(kind, kw, hook):
    model = build(kind, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for it in range(12):  # windows full (and the last step counted)
        if hook:
            set_cbn_iteration(model, it)
        x = torch.randn(4, 3, 8, 8, generator=gen)
        if it < 11:
            step(model, x, opt)
            opt.step()
            continue
        with SyncCounter() as counter:
            step(model, x, opt)
        assert counter.total == 0, dict(counter.ops)
        opt.step()
    if kind == 'cbn' and kw.get('window', 1) > 1:
        # the step was a real CBN step: bound layers with full windows (in
        # burn-in, the iterations from window - 1 before its end on)
        capacity = model.n1.window - 1
        recorded = 12 - max(0, kw.get('burnin', 0) - capacity)
        assert model.n1.bindings[0].status == 'bound'
        assert len(model.n1._windows[0]) == max(0, min(capacity, recorded))
    if kw.get('compensate') == 'upstream':  # the feeding norms followed
        assert [model.n2.bindings[0].upstream_followed,
                model.n3.bindings[0].upstream_followed] == [1, 2]


def test_counter_sees_what_would_synchronize():
    """The counter is not blind: the operators the rules forbid count."""
    x = torch.randn(4, 3)
    with SyncCounter() as counter:
        bool(x.sum() > 0)
        x.max().item()
        x[x > 0]
        torch.tensor([1.0, 2.0])
        torch.isfinite(x).all().tolist()
    assert counter.total >= 4, dict(counter.ops)


def test_nonfinite_entries_are_dropped_and_reported_after_the_step(mmlogs):
    """The semantics of the former host checks, now on the device: a
    non-finite entry is dropped and the warning comes when the flags are
    read (the hook's log interval, binding_report, or read_cbn_flags)."""
    model = build('cbn', window=3)
    model.n1.cbn_name = 'n1'
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(3):
        step(model, torch.randn(4, 3, 8, 8), opt)
    state = model.n1._windows[0]
    state._buffers['a_var'][0, 2] = float('inf')
    with SyncCounter() as counter:
        step(model, torch.randn(4, 3, 8, 8), opt)
    assert counter.total == 0
    assert not any('not finite' in m for m in mmlogs.messages)
    flags = read_cbn_flags(model)
    assert flags == {'n1': dict(dropped=1, skipped=0, not_stored=0)}
    assert any(m.startswith('n1: 1 compensated statistics') and
               'dropped' in m for m in mmlogs.messages)
    assert read_cbn_flags(model) == {}  # read and reset


def test_counter_sees_host_copies_and_not_same_device_casts():
    """A copy between devices waits on a GPU: ``.cpu()`` and ``.to('cpu')``
    (no-ops on a CPU tensor, host copies of a GPU one), a ``_to_copy`` to
    another device and a cross-device ``copy_`` count; casts that stay on
    the device do not."""
    x = torch.randn(4, 3)
    meta = torch.empty(4, 3, device='meta')
    moves = {
        'cpu()': lambda: x.cpu(),
        "to('cpu')": lambda: x.to('cpu'),
        "to(device='cpu')": lambda: x.to(device='cpu', dtype=torch.float64),
        "to('meta')": lambda: x.to('meta'),
        'copy_ across devices': lambda: meta.copy_(x),
    }
    for name, move in moves.items():
        with SyncCounter() as counter:
            move()
        assert counter.total == 1, (name, dict(counter.ops))
    casts = {
        'double()': lambda: x.double(),
        'to(float16)': lambda: x.to(torch.float16),
        'to(x.device, float64)': lambda: x.to(x.device, torch.float64),
        'to(x.device)': lambda: x.to(x.device),
        'copy_ with a cast': lambda: torch.empty_like(x).copy_(x.double()),
        'to(like)': lambda: x.to(torch.zeros(1, dtype=torch.float64)),
    }
    for name, cast in casts.items():
        with SyncCounter() as counter:
            cast()
        assert counter.total == 0, (name, dict(counter.ops))
    # the patched methods are gone again
    assert 'cpu' not in torch.Tensor.__dict__
    assert 'to' not in torch.Tensor.__dict__


def test_a_host_copy_injected_into_a_step_is_counted(monkeypatch):
    """A debugging ``.cpu()`` left in the hot path is caught by the step
    test above: the same step as there, with ``.cpu()`` of the batch mean
    inside the running-statistics update."""
    from mmcbn.cbn import _CrossIterationBatchNorm
    model = build('cbn', window=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for it in range(5):
        step(model, torch.randn(4, 3, 8, 8, generator=gen), opt)
        opt.step()
    x = torch.randn(4, 3, 8, 8, generator=gen)
    with SyncCounter() as counter:
        step(model, x, opt)
    assert counter.total == 0, dict(counter.ops)  # the control
    update = _CrossIterationBatchNorm._update_running_stats

    def with_host_copy(self, mean, var, count):
        mean.cpu()
        return update(self, mean, var, count)

    monkeypatch.setattr(_CrossIterationBatchNorm, '_update_running_stats',
                        with_host_copy)
    with SyncCounter() as counter:
        step(model, x, opt)
    assert counter.ops['Tensor.cpu'] == 4, dict(counter.ops)  # 4 layers
