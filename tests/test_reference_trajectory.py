# Copyright (c) mmcbn contributors. All rights reserved.
"""CBN against the independent reference along real SGD trajectories.

Two producer+CBN blocks are trained with SGD (momentum, a realistic learning
rate) in float64: once with mmcbn's CBN, once with the reference of
``reference_cbn.py`` (jvp-based compensation). Outputs at every step, the
weight trajectories and the running statistics must agree to float64
tolerance for every producer kind and window.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmcbn import CBN1d, CBN2d
from reference_cbn import ReferenceCBN

STEPS = 20

PRODUCERS = {
    'conv_bias': lambda: (nn.Conv2d(3, 6, 3, padding=1),
                          nn.Conv2d(6, 5, 3, padding=1)),
    'conv_no_bias': lambda: (nn.Conv2d(3, 6, 3, padding=1, bias=False),
                             nn.Conv2d(6, 5, 1, bias=False)),
    'conv_stride2': lambda: (nn.Conv2d(3, 6, 3, stride=2, padding=1),
                             nn.Conv2d(6, 5, 3, stride=2, padding=1)),
    'conv_dilation': lambda: (nn.Conv2d(3, 6, 3, padding=2, dilation=2),
                              nn.Conv2d(6, 5, 3, padding=3, dilation=3)),
    'conv_groups': lambda: (nn.Conv2d(3, 6, 3, padding=1),
                            nn.Conv2d(6, 4, 3, padding=1, groups=2)),
    'conv_depthwise': lambda: (nn.Conv2d(3, 6, 1),
                               nn.Conv2d(6, 6, 3, padding=1, groups=6,
                                         bias=False)),
    'linear': lambda: (nn.Linear(7, 6), nn.Linear(6, 5, bias=False)),
}


class Net(nn.Module):

    def __init__(self, p1, n1, p2, n2):
        super().__init__()
        self.p1, self.n1, self.p2, self.n2 = p1, n1, p2, n2

    def forward(self, x):
        return self.n2(self.p2(F.relu(self.n1(self.p1(x)))))


class RefNet(nn.Module):

    def __init__(self, r1, r2):
        super().__init__()
        self.r1, self.r2 = r1, r2

    def forward(self, x):
        return self.r2(F.relu(self.r1(x)))


def build_pair(kind, window, burnin=0, compensate=True,
               running_stats_from='batch'):
    torch.manual_seed(0)
    p1, p2 = PRODUCERS[kind]()
    norm = CBN1d if kind == 'linear' else CBN2d
    kw = dict(window=window, burnin=burnin, compensate=compensate,
              running_stats_from=running_stats_from)
    ours = Net(p1, norm(p1.out_features if kind == 'linear' else
                        p1.out_channels, **kw), p2,
               norm(p2.out_features if kind == 'linear' else
                    p2.out_channels, **kw)).double()
    ref_p1, ref_p2 = copy.deepcopy(ours.p1), copy.deepcopy(ours.p2)
    kw.pop('compensate')
    ref = RefNet(
        ReferenceCBN(ref_p1, ours.n1.num_features, compensate=compensate,
                     **kw),
        ReferenceCBN(ref_p2, ours.n2.num_features, compensate=compensate,
                     **kw)).double()
    return ours, ref


def batches(kind, steps=STEPS):
    gen = torch.Generator().manual_seed(1)
    shape = (4, 7) if kind == 'linear' else (2, 3, 8, 8)
    for step in range(steps):
        # a drifting input distribution, as features drift during training
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        x = x * (1 + 0.05 * step) + 0.1 * step
        target = torch.randn(shape[:1], generator=gen, dtype=torch.float64)
        yield x, target


def loss_fn(y, target):
    pooled = y.flatten(2).mean(2) if y.dim() > 2 else y
    return ((pooled.sum(1) - target)**2).mean() + 0.1 * torch.sin(2 * y).mean()


def train(model, kind, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    outputs = []
    for x, target in batches(kind):
        y = model(x)
        loss = loss_fn(y, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        outputs.append(y.detach())
    return outputs


def assert_same_trajectory(ours, ref, out_ours, out_ref):
    for step, (a, b) in enumerate(zip(out_ours, out_ref)):
        torch.testing.assert_close(
            a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f'step {step}: {m}')
    pairs = [(ours.p1, ref.r1.producer), (ours.p2, ref.r2.producer)]
    for mine, theirs in pairs:
        for (name, p), q in zip(mine.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)
    for mine, theirs in ((ours.n1, ref.r1), (ours.n2, ref.r2)):
        for name in ('weight', 'bias', 'running_mean', 'running_var'):
            torch.testing.assert_close(
                getattr(mine, name), getattr(theirs, name), rtol=1e-9,
                atol=1e-9)


@pytest.mark.parametrize('kind', sorted(PRODUCERS))
@pytest.mark.parametrize('window', [1, 2, 4, 8])
def test_matches_reference_along_sgd_trajectory(kind, window):
    ours, ref = build_pair(kind, window)
    out_ours, out_ref = train(ours, kind), train(ref, kind)
    assert_same_trajectory(ours, ref, out_ours, out_ref)
    if window > 1:
        bindings = ours.n1.bindings + ours.n2.bindings
        assert [b.status for b in bindings] == ['bound', 'bound']
    assert len(ours.n2._windows[0]) == window - 1


@pytest.mark.parametrize('kind', ['conv_bias', 'linear', 'conv_groups'])
def test_window_running_stats_match_reference(kind):
    """running_stats_from='window': the eval statistics follow the window
    mean and (unbiased, pooled) variance, from the end of burn-in on."""
    ours, ref = build_pair(kind, window=4, burnin=5,
                           running_stats_from='window')
    assert_same_trajectory(ours, ref, train(ours, kind), train(ref, kind))
    batch_ours, _ = build_pair(kind, window=4, burnin=5)
    train(batch_ours, kind)
    # and it is not the per-batch update (the test could fail)
    assert not torch.allclose(ours.n2.running_var, batch_ours.n2.running_var)


@pytest.mark.parametrize('kind', ['conv_bias', 'linear'])
def test_burnin_matches_reference(kind):
    ours, ref = build_pair(kind, window=4, burnin=7)
    assert_same_trajectory(ours, ref, train(ours, kind), train(ref, kind))


@pytest.mark.parametrize('kind', ['conv_stride2', 'conv_depthwise'])
def test_naive_window_matches_reference_and_differs_from_cbn(kind):
    naive, naive_ref = build_pair(kind, window=4, compensate=False)
    out_naive = train(naive, kind)
    assert_same_trajectory(naive, naive_ref, out_naive, train(naive_ref, kind))
    cbn, _ = build_pair(kind, window=4)
    out_cbn = train(cbn, kind)
    # the compensation is not a no-op on this trajectory
    assert max((a - b).abs().max() for a, b in zip(out_cbn, out_naive)) > 1e-3


def test_frozen_producer_uses_exact_window():
    """Frozen producers need no compensation: plain window averages."""
    ours, ref = build_pair('conv_bias', window=4, compensate=False)
    comp, _ = build_pair('conv_bias', window=4)
    for module in (ours.p1, ours.p2, ref.r1.producer, ref.r2.producer,
                   comp.p1, comp.p2):
        module.requires_grad_(False)
    out_ours = train(ours, 'conv_bias')
    assert_same_trajectory(ours, ref, out_ours, train(ref, 'conv_bias'))
    out_comp = train(comp, 'conv_bias')
    # n1 normalizes the output of a frozen conv of raw data: it depends on
    # no trainable parameter, so it is exact as recorded too
    assert comp.n1.bindings[0].status == 'frozen'
    assert 'depends on no trainable parameter' in comp.n1.bindings[0].reason
    assert comp.n2.bindings[0].status == 'frozen'
    for a, b in zip(out_comp, out_ours):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert len(comp.n2._windows[0]) == 3
