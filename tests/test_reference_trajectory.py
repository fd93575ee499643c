# Copyright (c) mmcbn contributors. All rights reserved.
"""CBN against the independent reference along real SGD trajectories.

Two producer+CBN blocks are trained with SGD (momentum, a realistic learning
rate) in float64: once with mmcbn's CBN, once with the reference of
``reference_cbn.py`` (jvp-based compensation). Outputs at every step, the
weight trajectories and the running statistics must agree to float64
tolerance for every producer kind and window, and for the BatchNorm options
(``affine``, ``momentum=None``, ``track_running_stats``), 1d/3d producers, a
computed weight (weight standardization), the chunked row-dot path and the
1x1 stride-2 shortcut conv.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
try:
    from mmcv.cnn.bricks.conv_ws import ConvWS2d
except ImportError:  # torch + mmengine only (the bare GPU check, docs/advanced_guides/testing.md)
    ConvWS2d = None
from torch import nn

import mmcbn.compensation
from mmcbn import CBN1d, CBN2d, CBN3d
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

#: Producers outside the kinds above (each with its norm and input shape).
EXTRA_PRODUCERS = {
    # ResNet's downsample shortcut: a 1x1 conv with stride 2 and no bias,
    # on even and odd feature sizes (odd: the last row/column is read)
    'shortcut_1x1_s2': lambda: (nn.Conv2d(3, 6, 3, padding=1),
                                nn.Conv2d(6, 5, 1, stride=2, bias=False)),
    'shortcut_1x1_s2_odd': lambda: (nn.Conv2d(3, 6, 3, padding=1),
                                    nn.Conv2d(6, 5, 1, stride=2,
                                              bias=False)),
    'conv1d': lambda: (nn.Conv1d(3, 6, 3, padding=1),
                       nn.Conv1d(6, 5, 3, stride=2, padding=1,
                                 bias=False)),
    'conv3d': lambda: (nn.Conv3d(3, 6, 3, padding=1),
                       nn.Conv3d(6, 5, (1, 3, 3), stride=(1, 2, 2),
                                 padding=(0, 1, 1))),
    # a computed (effective) weight: mmcv's weight standardization
    'conv_ws': lambda: (ConvWS2d(3, 6, 3, padding=1),
                        ConvWS2d(6, 5, 3, padding=1, bias=False)),
}
ALL_PRODUCERS = dict(PRODUCERS, **EXTRA_PRODUCERS)

SHAPES = {
    'linear': (4, 7),
    'conv1d': (2, 3, 16),
    'conv3d': (2, 3, 3, 6, 6),
    'shortcut_1x1_s2_odd': (2, 3, 7, 7),
}
NORMS = {'linear': CBN1d, 'conv1d': CBN1d, 'conv3d': CBN3d}


def standardized(module):
    """Weight standardization as mmcv's ConvWS2d defines it: per output
    channel, minus the mean, over the unbiased std plus eps."""
    w = module.weight
    flat = w.reshape(w.shape[0], -1)
    shape = (-1, ) + (1, ) * (w.dim() - 1)
    mean = flat.mean(1).view(shape)
    std = flat.std(1).view(shape)
    return (w - mean) / (std + module.eps)


def ws_reference_args(module):
    """How the reference sees a ConvWS producer: its output is linear in
    the standardized weight (the weight the convolution multiplies)."""

    def effective(m):
        params = dict(weight=standardized(m))
        if m.bias is not None:
            params['bias'] = m.bias
        return params

    def apply(params, inp):
        return F.conv2d(inp, params['weight'], params.get('bias'),
                        module.stride, module.padding, module.dilation,
                        module.groups)

    return dict(effective_params=effective, apply=apply)


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


def _channels(producer):
    return getattr(producer, 'out_features', None) or producer.out_channels


def build_pair(kind, window, burnin=0, compensate=True,
               running_stats_from='batch', window_grad=None, **bn_options):
    """mmcbn and reference models with identical initial parameters;
    ``bn_options``: ``affine``, ``momentum``, ``track_running_stats``;
    ``window_grad``: the backward rule (None: the default)."""
    torch.manual_seed(0)
    p1, p2 = ALL_PRODUCERS[kind]()
    norm = NORMS.get(kind, CBN2d)
    kw = dict(window=window, burnin=burnin, compensate=compensate,
              running_stats_from=running_stats_from, **bn_options)
    if window_grad is not None:
        kw['window_grad'] = window_grad
    ours = Net(p1, norm(_channels(p1), **kw), p2, norm(_channels(p2),
                                                       **kw)).double()
    ref_p1, ref_p2 = copy.deepcopy(ours.p1), copy.deepcopy(ours.p2)
    extra = [ws_reference_args(p) if kind == 'conv_ws' else {}
             for p in (ref_p1, ref_p2)]
    ref = RefNet(
        ReferenceCBN(ref_p1, ours.n1.num_features, **kw, **extra[0]),
        ReferenceCBN(ref_p2, ours.n2.num_features, **kw,
                     **extra[1])).double()
    return ours, ref


def batches(kind, steps=STEPS):
    gen = torch.Generator().manual_seed(1)
    shape = SHAPES.get(kind, (2, 3, 8, 8))
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
    assert len(out_ours) == len(out_ref) > 0
    for step, (a, b) in enumerate(zip(out_ours, out_ref)):
        torch.testing.assert_close(
            a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f'step {step}: {m}')
    pairs = [(ours.p1, ref.r1.producer), (ours.p2, ref.r2.producer)]
    for mine, theirs in pairs:
        for (name, p), q in zip(mine.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)
    for mine, theirs in ((ours.n1, ref.r1), (ours.n2, ref.r2)):
        for name in ('weight', 'bias', 'running_mean', 'running_var',
                     'num_batches_tracked'):
            a, b = getattr(mine, name), getattr(theirs, name)
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9,
                                           msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('kind', sorted(PRODUCERS))
@pytest.mark.parametrize('window', [1, 2, 4, 8])
@pytest.mark.parametrize('window_grad', [True, False],
                         ids=['window-rule', 'authors-rule'])
def test_matches_reference_along_sgd_trajectory(kind, window, window_grad):
    """Both backward rules (method note, "Gradients"): the reference's jvp
    Taylor terms are differentiable in the live parameters for the window
    rule, constants for the authors'."""
    ours, ref = build_pair(kind, window, window_grad=window_grad)
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
@pytest.mark.parametrize('window_grad', [True, False])
def test_burnin_matches_reference(kind, window_grad):
    ours, ref = build_pair(kind, window=4, burnin=7, window_grad=window_grad)
    assert_same_trajectory(ours, ref, train(ours, kind), train(ref, kind))


@pytest.mark.parametrize('kind', ['conv_stride2', 'conv_depthwise'])
def test_naive_window_matches_reference_and_differs_from_cbn(kind):
    naive, naive_ref = build_pair(kind, window=4, compensate=False)
    out_naive = train(naive, kind)
    assert_same_trajectory(naive, naive_ref, out_naive, train(naive_ref, kind))
    # naive values with the window gradient (the ablation control)
    control, control_ref = build_pair(kind, window=4, compensate=False,
                                      window_grad=True)
    out_control = train(control, kind)
    assert_same_trajectory(control, control_ref, out_control,
                           train(control_ref, kind))
    assert max((a - b).abs().max()
               for a, b in zip(out_control, out_naive)) > 1e-4
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


# ------------------------------------------ options outside the first kinds
@pytest.mark.parametrize('kind', sorted(EXTRA_PRODUCERS))
@pytest.mark.parametrize('window', [1, 4])
def test_more_producers_match_reference(kind, window):
    """Conv1d/Conv3d producers, the 1x1 stride-2 shortcut (even and odd
    sizes) and a computed weight (weight standardization)."""
    if kind == 'conv_ws' and ConvWS2d is None:
        pytest.skip('mmcv is not installed (its ConvWS2d is the producer)')
    ours, ref = build_pair(kind, window)
    assert_same_trajectory(ours, ref, train(ours, kind), train(ref, kind))
    if window > 1:
        assert [b.status for b in ours.n1.bindings + ours.n2.bindings] == [
            'bound', 'bound']
        naive, _ = build_pair(kind, window, compensate=False)
        # the compensation matters on this trajectory (the test can fail)
        diff = max((a - b).abs().max() for a, b in zip(
            train(build_pair(kind, window)[0], kind), train(naive, kind)))
        assert diff > 1e-4


OPTIONS = [
    dict(affine=False),
    dict(momentum=None),
    dict(momentum=None, running_stats_from='window', burnin=3),
    dict(track_running_stats=False),
    dict(affine=False, track_running_stats=False, burnin=3),
]


@pytest.mark.parametrize('kind', ['conv_groups', 'linear'])
@pytest.mark.parametrize('options', OPTIONS,
                         ids=['-'.join(f'{k}={v}' for k, v in o.items())
                              for o in OPTIONS])
def test_batchnorm_options_match_reference(kind, options):
    options = dict(options)
    burnin = options.pop('burnin', 0)
    ours, ref = build_pair(kind, window=4, burnin=burnin, **options)
    assert_same_trajectory(ours, ref, train(ours, kind), train(ref, kind))
    # and in eval mode (running statistics, or batch statistics without)
    ours.eval(), ref.eval()
    x = next(batches(kind, 1))[0] * 1.5 + 0.3
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-9, atol=1e-9)
    if options.get('track_running_stats', True):
        assert int(ours.n2.num_batches_tracked) == STEPS
    else:
        assert ours.n2.running_mean is None
    if options.get('affine', True) is False:
        assert ours.n2.weight is None and ours.n2.bias is None


@pytest.mark.parametrize('kind,chunk', [('conv_groups', 16),
                                        ('conv_bias', 16), ('linear', 16),
                                        ('conv_bias', 300),
                                        ('conv_dilation', 300)])
def test_chunked_row_dot_matches_reference(kind, chunk, monkeypatch):
    """The compensation's row-wise dot product in chunks of output channels
    (the path large layers take), forced with a tiny chunk size: one row
    per chunk (16 elements), or several rows in uneven chunks (300)."""
    monkeypatch.setattr(mmcbn.compensation, '_CHUNK_ELEMENTS', chunk)
    chunked_sums = []
    real_sum = torch.sum

    def counting_sum(*args, **kwargs):
        if 'out' in kwargs:
            chunked_sums.append(1)
        return real_sum(*args, **kwargs)

    monkeypatch.setattr(torch, 'sum', counting_sum)
    ours, ref = build_pair(kind, window=4)
    out_ours = train(ours, kind)
    assert chunked_sums, 'the chunked path did not run'
    monkeypatch.setattr(torch, 'sum', real_sum)
    assert_same_trajectory(ours, ref, out_ours, train(ref, kind))
