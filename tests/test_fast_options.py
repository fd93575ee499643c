# Copyright (c) mmcbn contributors. All rights reserved.
"""Opt-in fast compensation: sub-sampled moment gradient, reduced-precision
window storage. Both are checked against independent references."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmcbn import CBN2d, window_statistics
from mmcbn.binding import find_producer

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def reference_moment_grad(inp, weight, bias, args, stride, phase):
    """(2/m') sum over the sub-sampled output positions of x * patch, by
    autograd of the masked second moment (independent of mmcbn)."""
    w = weight.detach().clone().requires_grad_()
    x = CONV[inp.dim() - 2](inp, w, bias, **args)
    mask = torch.zeros_like(x)
    index = (slice(None), slice(None)) + tuple(
        slice(min(p, n - 1), None, stride) for p, n in zip(phase,
                                                           x.shape[2:]))
    mask[index] = 1
    m = mask[:, 0].sum()
    (grad, ) = torch.autograd.grad((mask * x.square()).sum() / m, w)
    return grad.reshape(grad.shape[0], -1)


@pytest.mark.parametrize('dims,args,shape', [
    (2, dict(stride=1, padding=1, dilation=1, groups=1), (2, 4, 9, 11)),
    (2, dict(stride=2, padding=1, dilation=1, groups=2), (2, 4, 10, 9)),
    (2, dict(stride=1, padding=2, dilation=2, groups=4), (1, 4, 8, 8)),
    (2, dict(stride=2, padding=0, dilation=1, groups=1), (3, 4, 7, 7)),
    (1, dict(stride=1, padding=1, dilation=1, groups=1), (2, 4, 13)),
    (3, dict(stride=1, padding=1, dilation=1, groups=2), (1, 4, 5, 6, 7)),
])
@pytest.mark.parametrize('stride', [1, 2, 3])
def test_subsampled_moment_gradient_matches_the_subset(dims, args, shape,
                                                       stride):
    torch.manual_seed(0)
    kernel = (3, ) * dims if args['stride'] == 1 or args['padding'] else \
        (1, ) * dims
    weight = torch.randn((8, 4 // args["groups"]) + kernel,
                         dtype=torch.float64)
    bias = torch.randn(8, dtype=torch.float64)
    inp = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = CONV[dims](inp, weight.requires_grad_(), bias, **args)
    prod = find_producer(out).producer
    for phase in ((0, ) * dims, (1, ) * dims, tuple(range(dims))):
        phase = tuple(p % stride for p in phase)
        got = prod.moment_weight_grad(out.detach(), stride, phase)
        ref = reference_moment_grad(inp.detach(), weight, bias, args,
                                    stride, phase)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def _trajectory(seed=0, steps=10, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), CBN2d(8, **kw),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          CBN2d(8, **kw))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    outs = []
    for _ in range(steps):
        y = model(torch.randn(4, 3, 12, 12, generator=gen))
        loss = (y**2).mean() + y.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        outs.append(y.detach())
    return model, outs


def _window_under_drift(**kw):
    """A conv whose weights drift by the same random steps in every
    variant (so only the estimator differs): the window statistics at
    iteration 6 and the true statistics of the old batches now."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), CBN2d(8, window=4,
                                                               **kw))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 12, 12, generator=gen) for _ in range(6)]
    with torch.no_grad():
        conv = model[0]
        for x in batches:
            with torch.enable_grad():
                model(x)
            conv.weight.add_(0.01 * torch.randn(conv.weight.shape,
                                                generator=gen))
            conv.bias.add_(0.01 * torch.randn(8, generator=gen))
        truth = {}
        for lag in (1, 2, 3):
            out = conv(batches[6 - lag])
            truth[lag] = (out.mean((0, 2, 3)), out.var((0, 2, 3),
                                                       unbiased=False))
    return window_statistics(model, model[1], 0, 6), truth


def _rel_error(stats, truth):
    err = 0.0
    for lag, (mean, var) in truth.items():
        err += ((stats[lag][0] - mean).norm() / mean.norm()).item()
        err += ((stats[lag][1] - var).norm() / var.norm()).item()
    return err / (2 * len(truth))


def test_fast_options_keep_most_of_the_compensation():
    exact, truth = _window_under_drift()
    naive, _ = _window_under_drift(compensate=False)
    err_exact, err_naive = _rel_error(exact, truth), _rel_error(naive,
                                                                truth)
    assert err_exact < 0.25 * err_naive  # compensation works here
    for kw in (dict(moment_stride=2), dict(store_dtype='bfloat16'),
               dict(moment_stride=2, store_dtype='bfloat16')):
        fast, _ = _window_under_drift(**kw)
        err = _rel_error(fast, truth)
        assert err != err_exact  # the option really changes the estimate
        # most of the gain over the naive window is kept
        assert err - err_exact < 0.25 * (err_naive - err_exact), (kw, err)


def test_bfloat16_storage_halves_the_entries_and_compensates_in_float32():
    model, _ = _trajectory(window=4, store_dtype='bfloat16')
    layer = model[4]
    state = layer._windows[0]
    assert state._buffers['var_grad'].dtype == torch.bfloat16
    assert state._buffers['a_var'].dtype == torch.float32
    exact, _ = _trajectory(window=4)
    grad_bytes = exact[4]._windows[0]._buffers['var_grad'].nbytes
    assert state._buffers['var_grad'].nbytes * 2 == grad_bytes
    # the compensated variance is a_var + Gc_bf16 . W - (shift of the
    # mean)^2, computed in float32 from the rounded entries (independently)
    conv = model[3]
    buf = state._buffers
    t = layer.iteration + 1
    stats = window_statistics(model, layer, 0, t)
    w = conv.weight.detach().reshape(8, -1)
    b = conv.bias.detach()
    for slot, it in enumerate(state.iterations):
        lag = t - it
        if lag not in stats:
            continue
        mean = buf['a_mean'][slot] + buf['pbar'][slot, 0] @ w.t() + b
        var = buf['a_var'][slot] + (buf['var_grad'][slot].float() *
                                    w).sum(1) - (mean -
                                                 buf['raw_mean'][slot])**2
        torch.testing.assert_close(stats[lag][0], mean, rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(stats[lag][1], var.clamp(min=0),
                                   rtol=1e-4, atol=1e-5)


def test_fast_options_are_validated_and_shown():
    with pytest.raises(ValueError, match='moment_stride must be an integer '
                       '>= 1, got 0'):
        CBN2d(4, moment_stride=0)
    with pytest.raises(ValueError, match="store_dtype must be None, "
                       "'bfloat16' or 'float16', got 'fp8'"):
        CBN2d(4, store_dtype='fp8')
    text = repr(CBN2d(4, moment_stride=2, store_dtype='bfloat16'))
    assert "moment_stride=2" in text and "store_dtype='bfloat16'" in text
    assert 'moment_stride' not in repr(CBN2d(4))
