# Copyright (c) mmcbn contributors. All rights reserved.
"""Upstream-normalization compensation (``compensate='upstream'``) against
the independent float64 reference of ``reference_upstream.py``, along SGD
trajectories, and its binding (which paths are followed, which fall
back)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmcbn import CBN1d, CBN2d
from reference_cbn import ReferenceCBN
from reference_upstream import ReferenceUpstreamCBN

STEPS = 14


def _affine(aff, xhat):
    shape = (1, -1) + (1, ) * (xhat.dim() - 2)
    return aff[0].view(shape) * xhat + aff[1].view(shape)


class ResidualNet(nn.Module):
    """conv0 -> n0 -> relu = h; conv1(h) -> n1; z = relu(n1 + h);
    conv2(z) -> n2: n1 is fed by n0 through one gate, n2 by n1 and by n0
    through two gates and a residual add."""

    def __init__(self, convs, norms):
        super().__init__()
        self.conv0, self.conv1, self.conv2 = convs
        self.n0, self.n1, self.n2 = norms

    def forward(self, x):
        h = F.relu(self.n0(self.conv0(x)))
        z = F.relu(self.n1(self.conv1(h)) + h)
        return self.n2(self.conv2(z))


def _convs(linear: bool = False):
    if linear:
        return (nn.Linear(3, 4), nn.Linear(4, 4, bias=False),
                nn.Linear(4, 5))
    return (nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1,
                                                     bias=False),
            nn.Conv2d(4, 5, 3, padding=1))


def _pair(window, burnin, window_grad, linear=False, seed=0):
    torch.manual_seed(seed)
    convs = _convs(linear)
    norm = CBN1d if linear else CBN2d
    ours = ResidualNet(
        copy.deepcopy(convs),
        [norm(c, window=window, burnin=burnin, compensate='upstream',
              window_grad=window_grad) for c in (4, 4, 5)]).double()
    r_convs = copy.deepcopy(convs)
    r0 = ReferenceCBN(r_convs[0], 4, window, burnin,
                      window_grad=window_grad)
    r1 = ReferenceUpstreamCBN(
        r_convs[1], 4, window, [r0],
        lambda affs, xh: F.relu(_affine(affs[0], xh[0])), burnin,
        window_grad=window_grad)
    r2 = ReferenceUpstreamCBN(
        r_convs[2], 5, window, [r1, r0],
        lambda affs, xh: F.relu(_affine(affs[0], xh[0]) + F.relu(
            _affine(affs[1], xh[1]))), burnin, window_grad=window_grad)

    class Ref(nn.Module):

        def __init__(self):
            super().__init__()
            self.r0, self.r1, self.r2 = r0, r1, r2

        def forward(self, x):
            h = F.relu(self.r0(x))
            z = F.relu(self.r1(h) + h)
            return self.r2(z)

    return ours, Ref().double()


def _params(ours, ref):
    """Matching (name, ours, reference) parameters."""
    pairs = []
    for i in range(3):
        conv, rconv = getattr(ours, f'conv{i}'), getattr(ref, f'r{i}').producer
        for n, p in conv.named_parameters():
            pairs.append((f'conv{i}.{n}', p, getattr(rconv, n)))
        norm, rnorm = getattr(ours, f'n{i}'), getattr(ref, f'r{i}')
        pairs += [(f'n{i}.weight', norm.weight, rnorm.weight),
                  (f'n{i}.bias', norm.bias, rnorm.bias)]
    return pairs


def _loss(y, target):
    return ((y - target)**2).mean() + y.sin().mean()


def _train(ours, ref, shape, steps=STEPS, lr=0.2):
    gen = torch.Generator().manual_seed(1)
    opt_a = torch.optim.SGD(ours.parameters(), lr=lr, momentum=0.9)
    opt_b = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
    for step in range(steps):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * (
            1 + step % 3)
        target = torch.randn(shape[:1] + (5, ) + shape[2:], generator=gen,
                             dtype=torch.float64)
        ya, yb = ours(x), ref(x)
        torch.testing.assert_close(ya, yb, rtol=1e-9, atol=1e-9,
                                   msg=f'output at step {step}')
        for model, y, opt in ((ours, ya, opt_a), (ref, yb, opt_b)):
            opt.zero_grad()
            _loss(y, target).backward()
        for name, a, b in _params(ours, ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-7,
                                       atol=1e-9,
                                       msg=f'{name}.grad at step {step}')
        opt_a.step()
        opt_b.step()


@pytest.mark.parametrize('window,burnin', [(3, 2), (4, 1)])
@pytest.mark.parametrize('window_grad', [True, False])
def test_upstream_matches_reference_conv(window, burnin, window_grad):
    ours, ref = _pair(window, burnin, window_grad)
    _train(ours, ref, (2, 3, 5, 5))
    feeds = [b.upstream for b in ours.n2.bindings]
    assert feeds and 'CBN2d(4), CBN2d(4)' in feeds[0]


def test_upstream_matches_reference_linear():
    ours, ref = _pair(3, 1, True, linear=True)
    _train(ours, ref, (6, 3))


def test_upstream_changes_the_statistics():
    """The upstream term is not zero: producer-only compensation differs
    from upstream compensation on the same trajectory (a wrong sign or
    a dropped term would make the reference test fail; this one pins
    that the test exercises a non-trivial correction)."""
    ours, _ = _pair(3, 3, True)
    plain = copy.deepcopy(ours)
    for n in (plain.n0, plain.n1, plain.n2):
        n.compensate = True
    gen = torch.Generator().manual_seed(3)
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.2)
    opt_b = torch.optim.SGD(plain.parameters(), lr=0.2)
    gaps = []
    for step in range(6):
        x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)
        ya, yb = ours(x), plain(x)
        gaps.append(float((ya - yb).detach().abs().max()))
        for y, opt in ((ya, opt_a), (yb, opt_b)):
            opt.zero_grad()
            y.sin().mean().backward()
            opt.step()
    assert gaps[:3] == [0.0, 0.0, 0.0]  # burn-in: the same
    assert min(gaps[3:]) > 1e-4
