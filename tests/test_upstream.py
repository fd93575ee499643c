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
from reference_upstream import ReferenceUpstreamCBN, compare_trajectories

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
              window_grad=window_grad, upstream_form='exact')
         for c in (4, 4, 5)]).double()
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
    compare_trajectories(
        ours, ref, shape, _params, steps,
        lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
        _loss)


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


# ------------------------------------------------------------ the binding
def _step(model, x, steps=4):
    for _ in range(steps):
        model.zero_grad()
        model(x).sin().sum().backward()


class _Chain(nn.Module):
    """conv -> norm0 -> ``between`` -> conv (``groups``) -> CBN."""

    def __init__(self, norm0, between, groups=1, compensate='upstream'):
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3, padding=1)
        self.n0 = norm0
        self.between = between
        self.c1 = nn.Conv2d(4, 4, 3, padding=1, groups=groups)
        self.n1 = CBN2d(4, window=3, compensate=compensate,
                        upstream_form='exact')

    def forward(self, x):
        return self.n1(self.c1(self.between(self.n0(self.c0(x)))))


@pytest.mark.parametrize('norm0,between,groups,fallback', [
    (lambda: CBN2d(4, window=3), nn.Tanh(), 1, 'TanhBackward0'),
    (lambda: nn.BatchNorm2d(4), nn.ReLU(), 1, 'NativeBatchNormBackward0'),
    (lambda: CBN2d(4, window=3), nn.LeakyReLU(0.1), 1,
     'LeakyReluBackward0'),
    (lambda: CBN2d(4, window=3), nn.ReLU(), 2,
     'a grouped convolution (groups=2: '),
])
def test_unsupported_paths_fall_back_to_producer_compensation(
        norm0, between, groups, fallback):
    """A path the binding cannot follow is named in the binding report and
    the health counts, and the layer then computes exactly what
    ``compensate=True`` computes."""
    torch.manual_seed(0)
    up = _Chain(norm0(), between, groups).double()
    plain = copy.deepcopy(up)
    plain.n1.compensate = True
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    _step(up, x)
    _step(plain, x)
    for a, b in zip(up.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    info = up.n1.bindings[0]
    assert fallback in info.upstream
    assert (info.upstream_followed, info.upstream_fallbacks) == (0, 1)
    from mmcbn.health import read_cbn_health
    health = read_cbn_health(up)
    assert health['upstream_followed'] == 0
    assert health['upstream_fallbacks'] == 1


def test_feeding_norms_are_limited_and_named():
    """A residual chain reaches many norms: the nearest MAX_FEEDING are
    followed, the others fall back, by name."""
    from mmcbn import name_cbn_layers
    from mmcbn.control import binding_report, binding_summary
    from mmcbn.upstream import MAX_FEEDING

    class Deep(nn.Module):

        def __init__(self, depth):
            super().__init__()
            self.convs = nn.ModuleList(
                nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1)
                for i in range(depth + 1))
            self.norms = nn.ModuleList(
                CBN2d(4, window=2, compensate='upstream',
                      upstream_form='exact')
                for _ in range(depth + 1))

        def forward(self, x):
            h = F.relu(self.norms[0](self.convs[0](x)))
            for conv, norm in zip(self.convs[1:-1], self.norms[1:-1]):
                h = F.relu(norm(conv(h)) + h)
            return self.norms[-1](self.convs[-1](h))

    depth = MAX_FEEDING + 2
    model = Deep(depth).double()
    name_cbn_layers(model)
    _step(model, torch.randn(2, 3, 5, 5, dtype=torch.float64), 3)
    last = model.norms[-1].bindings[0]
    assert last.upstream_followed == MAX_FEEDING
    assert last.upstream_fallbacks == depth - MAX_FEEDING
    assert f'more than {MAX_FEEDING} feeding norms' in last.upstream
    # nearest first: the last block's norm is followed, the first is not
    followed, _, rest = last.upstream.partition(' | not followed: ')
    assert f'norms.{depth - 1}' in followed and 'norms.0 ' in rest
    report = binding_report(model)[f'norms.{depth}'][0]
    assert report.startswith(f'convs.{depth} [upstream: norms.{depth - 1}')
    assert 'upstream: ' in binding_summary(model)


def test_option_values():
    with pytest.raises(ValueError, match="compensate must be True, False or "
                       "'upstream', got 'upstreams'"):
        CBN2d(4, compensate='upstreams')
    layer = CBN2d(4, compensate='upstream')
    assert layer.window_grad is True
    assert "compensate='upstream'" in repr(layer)
    assert 'window_grad' not in repr(layer)


@pytest.mark.parametrize('form', ['exact', 'fast'])
def test_stock_detector_binding_coverage(form):
    """Faster R-CNN R50-FPN (mmdet, unmodified): the residual paths of the
    backbone, FPN's upsample-add and the RoI extractor (RoIAlign per
    pyramid level, its indexed assignment, the zero products it adds for
    an empty level) are followed; what is left is the feeding-norm limit
    of the long residual chains; training runs."""
    pytest.importorskip('mmdet')
    import math
    from mm_builders import build, det_batch, faster_rcnn_cfg, train_steps
    from mmcbn import name_cbn_layers
    from mmcbn.health import read_cbn_health
    model = build('mmdet', faster_rcnn_cfg(
        dict(type='CBN', window=3, burnin=1, compensate='upstream',
             upstream_form=form)))
    name_cbn_layers(model)
    losses = train_steps(model, det_batch, steps=2)
    assert all(math.isfinite(v) for v in losses)
    info = {name: m.bindings[0] for name, m in model.named_modules()
            if getattr(m, 'bindings', None)}
    assert 'backbone.layer2.1.bn3' in info['backbone.layer2.2.bn1'].upstream
    fpn = info['neck.fpn_convs.0.bn']
    assert fpn.upstream == ', '.join(
        f'neck.lateral_convs.{i}.bn' for i in range(4))
    head = info['roi_head.bbox_head.shared_convs.0.bn']
    assert head.upstream_followed >= 1 and head.upstream_fallbacks == 0
    assert head.upstream.startswith('neck.fpn_convs.')
    assert info['roi_head.bbox_head.shared_convs.1.bn'].upstream == \
        'roi_head.bbox_head.shared_convs.0.bn'
    reasons = [r for b in info.values() for r in b.upstream_not_followed]
    health = read_cbn_health(model)
    assert health['upstream_followed'] > 90
    if form == 'exact':  # at most 4 feeding norms: long residual chains
        assert reasons and all('more than 4 feeding' in r for r in reasons)
        assert health['upstream_fallbacks'] == len(reasons)
    else:  # 8: every residual chain of a ResNet-50
        assert reasons == [] and health['upstream_fallbacks'] == 0


def test_complete_feeding_reuses_the_directions_for_d_nu_dw(monkeypatch):
    """Where the producer's input is made of the feeding norms' outputs
    alone, its own d nu / dW comes from the directions' product (no second
    weight-gradient conv); the reference tests pin its value."""
    from mmcbn.binding import Producer
    direct = []
    original = Producer.moment_weight_grad
    original_fused = Producer.mean_and_moment_grads

    def counted(self, x, stride=1, phase=(), inp=None):
        if inp is None:
            direct.append(x.shape[1])
        return original(self, x, stride, phase, inp)

    def counted_fused(self, x, mean):
        # (with the patch mean, in one call, where that saves one)
        out = original_fused(self, x, mean)
        if out is not None:
            direct.append(x.shape[1])
        return out

    monkeypatch.setattr(Producer, 'moment_weight_grad', counted)
    monkeypatch.setattr(Producer, 'mean_and_moment_grads', counted_fused)
    ours, _ = _pair(3, 0, True)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    _step(ours, x, 3)
    # only n0 (fed by the data) computes it directly
    assert direct == [4, 4, 4]
    feeding = [b.upstream for b in ours.n2.bindings]
    assert feeding == ['CBN2d(4), CBN2d(4)']


def test_running_statistics_default_follows_the_compensation():
    """running_stats_from=None: window statistics with the upstream
    compensation (its networks need them at batch 2), batch ones
    otherwise; an explicit value wins."""
    assert CBN2d(4, compensate='upstream').running_stats_from == 'window'
    assert CBN2d(4).running_stats_from == 'batch'
    assert CBN2d(4, compensate=False).running_stats_from == 'batch'
    assert CBN2d(4, compensate='upstream',
                 running_stats_from='batch').running_stats_from == 'batch'
    assert CBN2d(4, running_stats_from='window').running_stats_from == \
        'window'
