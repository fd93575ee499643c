# Copyright (c) mmcbn contributors. All rights reserved.
"""Property-based tests of the CBN layer (issue 11, "fuzzing").

Hypothesis draws the producer (conv 1d/2d/3d with any kernel, stride,
padding, dilation, groups and bias, or a linear layer), the batch, the
window, the burn-in, the dtype and the call pattern (each forward an
iteration, or ``set_cbn_iteration`` with one to three call positions per
iteration). Properties:

- with a window of 1, or inside burn-in, CBN is ``nn.BatchNorm``: outputs,
  input and parameter gradients, running statistics;
- with the producer's weights held, compensation is zero and the window is
  BatchNorm over the pooled last ``window`` batches of its call position;
- while training (also with the opt-in ``moment_stride`` and
  ``store_dtype``), outputs, gradients, running statistics and window
  entries stay finite, with at most ``window - 1`` entries per position;
- a slice of the independent float64 reference trajectory
  (``reference_cbn.py``) agrees for drawn producers and settings.

The examples are fixed (derandomized) in CI: see ``tests/conftest.py``.
"""
import copy

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mmcbn import CBN1d, CBN2d, CBN3d, set_cbn_iteration
from reference_cbn import ReferenceCBN

NORMS = {1: (CBN1d, nn.BatchNorm1d), 2: (CBN2d, nn.BatchNorm2d),
         3: (CBN3d, nn.BatchNorm3d)}
DTYPES = {'float32': torch.float32, 'float64': torch.float64}
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5),
       torch.float64: dict(rtol=1e-9, atol=1e-10)}


@st.composite
def producers(draw, kinds=('conv1d', 'conv2d', 'conv2d', 'conv3d',
                           'linear')):
    """A producer layer's arguments and a batch shape it accepts."""
    kind = draw(st.sampled_from(kinds))
    bias = draw(st.booleans())
    if kind == 'linear':
        return dict(kind=kind, c_in=draw(st.integers(1, 5)),
                    c_out=draw(st.integers(1, 5)), bias=bias,
                    n=draw(st.integers(2, 5)))
    nd = int(kind[4])
    groups = draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 2))
    dilation = draw(st.integers(1, 2))
    span = dilation * (kernel - 1) + 1
    smallest = max(1, span - 2 * padding)
    size = draw(st.integers(smallest, smallest + (3 if nd < 3 else 1)))
    stride = draw(st.integers(1, 2))
    out = (size + 2 * padding - span) // stride + 1
    n = draw(st.integers(1, 3))
    if n * out**nd < 2:  # BatchNorm needs 2 values per channel
        n = 2
    return dict(kind=kind, nd=nd, groups=groups,
                c_in=groups * draw(st.integers(1, 2)),
                c_out=groups * draw(st.integers(1, 3)), kernel=kernel,
                stride=stride, padding=padding, dilation=dilation, bias=bias,
                size=size, n=n)


def make_producer(cfg):
    if cfg['kind'] == 'linear':
        return nn.Linear(cfg['c_in'], cfg['c_out'], bias=cfg['bias'])
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[cfg['nd'] - 1]
    return conv(cfg['c_in'], cfg['c_out'], cfg['kernel'], cfg['stride'],
                cfg['padding'], cfg['dilation'], cfg['groups'], cfg['bias'])


def norm_classes(cfg):
    return NORMS[1 if cfg['kind'] == 'linear' else cfg['nd']]


def input_shape(cfg):
    if cfg['kind'] == 'linear':
        return (cfg['n'], cfg['c_in'])
    return (cfg['n'], cfg['c_in']) + (cfg['size'], ) * cfg['nd']


def inputs(cfg, count, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(input_shape(cfg), generator=gen) * (1 + 0.1 * i) +
             0.2 * i).to(dtype) for i in range(count)]


def build(cfg, dtype, seed, **kw):
    """The producer + CBN block and its nn.BatchNorm twin."""
    torch.manual_seed(seed)
    cbn_cls, bn_cls = norm_classes(cfg)
    producer = make_producer(cfg)
    model = nn.Sequential(producer, cbn_cls(cfg['c_out'], **kw)).to(dtype)
    twin = nn.Sequential(copy.deepcopy(producer),
                         bn_cls(cfg['c_out'])).to(dtype)
    twin.load_state_dict(model.state_dict())
    return model, twin


def loss_of(y):
    coef = torch.linspace(-1, 1, y.shape[1], dtype=y.dtype)
    coef = coef.view((1, -1) + (1, ) * (y.dim() - 2))
    return (y * coef).mean() + 0.1 * torch.sin(2 * y).mean()


def run(model, xs_per_iter, calls, lr):
    """Train; ``calls`` is 'each' (every forward an iteration) or the
    number of call positions per iteration given by set_cbn_iteration.
    Returns per call: the output, the input gradient and the parameter
    gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5)
    record = []
    for it, xs in enumerate(xs_per_iter):
        if calls != 'each':
            set_cbn_iteration(model, it)
        opt.zero_grad()
        loss = 0
        outs = []
        for x in xs:
            x = x.clone().requires_grad_()
            y = model(x)
            outs.append((x, y))
            loss = loss + loss_of(y)
        loss.backward()
        for x, y in outs:
            record.append([y.detach(), x.grad] +
                          [p.grad.clone() for p in model.parameters()])
        opt.step()
    return record


def group(xs, calls):
    """Split a list of inputs into iterations of ``calls`` positions."""
    per = 1 if calls == 'each' else calls
    return [xs[i:i + per] for i in range(0, len(xs), per)]


def window_tensors_finite(layer):
    return all(
        torch.isfinite(b).all() for s in layer._windows
        for b in s._buffers.values() if b.is_floating_point())


CALLS = st.sampled_from(['each', 1, 2, 3])


@given(cfg=producers(), window=st.integers(1, 6), burnin=st.integers(0, 6),
       steps=st.integers(1, 4), calls=CALLS,
       dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 999),
       momentum=st.sampled_from([0.1, None]))
def test_window_one_or_burnin_is_batchnorm(cfg, window, burnin, steps, calls,
                                           dtype, seed, momentum):
    if window > 1:
        burnin = max(burnin, steps)  # every iteration inside burn-in
    dtype = DTYPES[dtype]
    model, twin = build(cfg, dtype, seed, window=window, burnin=burnin,
                        momentum=momentum)
    twin[1].momentum = momentum
    per = 1 if calls == 'each' else calls
    xs = group(inputs(cfg, steps * per, dtype, seed), calls)
    ours = run(model, xs, calls, lr=0.1)
    theirs = run(twin, xs, calls, lr=0.1)
    for step, (a_all, b_all) in enumerate(zip(ours, theirs)):
        for a, b in zip(a_all, b_all):
            torch.testing.assert_close(
                a, b, **TOL[dtype], msg=lambda m: f'call {step}: {m}')
    for name in ('running_mean', 'running_var', 'num_batches_tracked'):
        torch.testing.assert_close(getattr(model[1], name),
                                   getattr(twin[1], name), **TOL[dtype])


def pooled_batchnorm(feats, layer):
    """BatchNorm of the last batch with the statistics of all of them, and
    the per-channel conditioning ``mean^2 / (var + eps)`` of those."""
    cat = torch.cat(feats)
    dims = [d for d in range(cat.dim()) if d != 1]
    mean, var = cat.mean(dims), cat.var(dims, unbiased=False)
    y = F.batch_norm(feats[-1], mean, var, layer.weight, layer.bias, False,
                     0.0, layer.eps)
    return y, mean.square() / (var + layer.eps)


def assert_close_conditioned(actual, expected, cond, msg):
    """``TOL`` plus the rounding of a second moment stored about zero.

    A window entry keeps ``nu = var + mean^2`` and the layer takes
    ``var = nu - mean^2``: in a channel whose mean is large against its
    spread this cancels, and the variance is only good to about
    ``unit * (1 + mean^2 / var)`` relative (BatchNorm's own kernel, on the
    current batch, does not cancel). The bound allows that, per channel.
    """
    dtype = expected.dtype
    unit = torch.finfo(dtype).eps
    shape = (1, -1) + (1, ) * (expected.dim() - 2)
    cond = cond.view(shape)
    bound = (TOL[dtype]['atol'] + TOL[dtype]['rtol'] * expected.abs() +
             8 * unit * ((1 + cond) * expected.abs() + cond.sqrt()))
    excess = (actual - expected).abs() - bound
    assert (excess <= 0).all(), (
        f'{msg}: off by {float((actual - expected).abs().max()):.3g}, '
        f'{int((excess > 0).sum())} elements beyond the bound')


@given(cfg=producers(), window=st.integers(2, 5), burnin=st.integers(0, 3),
       steps=st.integers(2, 7), calls=CALLS,
       dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 999),
       compensate=st.booleans())
def test_held_weights_window_is_pooled_batchnorm(cfg, window, burnin, steps,
                                                 calls, dtype, seed,
                                                 compensate):
    """lr = 0: the recorded statistics are exact at the current weights, so
    the window (compensated or not) is BatchNorm over the last ``window``
    batches of the call position (equal batch sizes), after burn-in."""
    dtype = DTYPES[dtype]
    model, _ = build(cfg, dtype, seed, window=window, burnin=burnin,
                     compensate=compensate)
    per = 1 if calls == 'each' else calls
    xs = group(inputs(cfg, steps * per, dtype, seed), calls)
    record = run(model, xs, calls, lr=0.0)
    producer, layer = model
    with torch.no_grad():
        feats = [[producer(x) for x in it_xs] for it_xs in xs]
    for it in range(steps):
        k = 1 if it < burnin else min(window, it + 1)
        for pos in range(per):
            history = [feats[t][pos] for t in range(it - k + 1, it + 1)]
            expected, cond = pooled_batchnorm(history, layer)
            assert_close_conditioned(record[it * per + pos][0], expected,
                                     cond, f'iteration {it}, call {pos}')
    assert len(layer._windows) == per
    assert all(len(s) == min(steps, window - 1) for s in layer._windows)


@given(cfg=producers(), window=st.integers(2, 6), burnin=st.integers(0, 3),
       steps=st.integers(3, 8), calls=CALLS,
       dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 999),
       compensate=st.booleans(),
       running_stats_from=st.sampled_from(['batch', 'window']),
       moment_stride=st.integers(1, 3),
       store_dtype=st.sampled_from([None, 'bfloat16', 'float16']))
def test_training_stays_finite(cfg, window, burnin, steps, calls, dtype,
                               seed, compensate, running_stats_from,
                               moment_stride, store_dtype):
    dtype = DTYPES[dtype]
    model, twin = build(cfg, dtype, seed, window=window, burnin=burnin,
                        compensate=compensate,
                        running_stats_from=running_stats_from,
                        moment_stride=moment_stride, store_dtype=store_dtype)
    per = 1 if calls == 'each' else calls
    xs = group(inputs(cfg, steps * per, dtype, seed), calls)
    record = run(model, xs, calls, lr=0.05)
    layer = model[1]
    shape = twin(xs[0][0]).shape
    for call, tensors in enumerate(record):
        assert tensors[0].shape == shape
        for t in tensors:
            assert t.dtype == dtype and torch.isfinite(t).all(), call
    assert torch.isfinite(layer.running_mean).all()
    assert torch.isfinite(layer.running_var).all()
    assert window_tensors_finite(layer)
    assert int(layer.num_batches_tracked) == steps * per
    assert [b.status for b in layer.bindings] == ['bound'] * per
    assert all(len(s) == min(steps, window - 1) for s in layer._windows)


@settings(max_examples=max(1, settings.default.max_examples // 2))
@given(cfg=producers(kinds=('conv1d', 'conv2d', 'linear')),
       window=st.integers(1, 4), burnin=st.integers(0, 3),
       compensate=st.booleans(),
       running_stats_from=st.sampled_from(['batch', 'window']),
       window_grad=st.sampled_from([None, True, False]),
       seed=st.integers(0, 999))
def test_reference_trajectory_slice(cfg, window, burnin, compensate,
                                    running_stats_from, window_grad, seed):
    """Six float64 SGD steps against the independent jvp reference, with
    either backward rule (None: the default)."""
    torch.manual_seed(seed)
    producer = make_producer(cfg).double()
    cbn_cls, _ = norm_classes(cfg)
    ours = nn.Sequential(
        producer,
        cbn_cls(cfg['c_out'], window=window, burnin=burnin,
                compensate=compensate, running_stats_from=running_stats_from,
                window_grad=window_grad)).double()
    ref = ReferenceCBN(copy.deepcopy(producer), cfg['c_out'], window=window,
                       burnin=burnin, compensate=compensate,
                       running_stats_from=running_stats_from,
                       window_grad=window_grad).double()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
            for m in (ours, ref)]
    for step, x in enumerate(inputs(cfg, 6, torch.float64, seed)):
        outs = []
        for model, opt in zip((ours, ref), opts):
            y = model(x)
            opt.zero_grad()
            loss_of(y).backward()
            opt.step()
            outs.append(y.detach())
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-8, atol=1e-9,
                                   msg=lambda m: f'step {step}: {m}')
    for p, q in zip(ours[0].parameters(), ref.producer.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-9)
    for name in ('weight', 'bias', 'running_mean', 'running_var'):
        torch.testing.assert_close(getattr(ours[1], name),
                                   getattr(ref, name), rtol=1e-8, atol=1e-9)
    if window > 1:
        assert ours[1].bindings[0].status == 'bound'
