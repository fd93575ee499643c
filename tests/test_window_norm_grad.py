# Copyright (c) mmcbn contributors. All rights reserved.
"""The window normalization's gradients on both of its backward paths.

A local (CBN) normalization on CPU takes BatchNorm's backward kernel with a
scaled weight plus one pass; a distributed source (SyncCBN) takes the
general path (reduce, combine the sums, element-wise). Both are checked
against plain autograd through the window average, and against each other
through a one-process source that takes the general path.
"""
import pytest
import torch

from mmcbn.functional import batch_stats, window_norm
from mmcbn.stats_source import StatsSource

EPS = 1e-5


class OneProcessSource(StatsSource):
    """A 'distributed' source over one process: the general backward path
    with the local numbers."""

    distributed = True


def autograd_reference(x, weight, bias, hist_count, hist_mean, hist_var):
    """y through the window average in plain autograd: only the current
    entry depends on ``x``."""
    dims = (0, ) + tuple(range(2, x.dim()))
    count = torch.cat([hist_count.new_full((1, ), x.numel() / x.shape[1]),
                       hist_count])
    keep = count > 0
    means = torch.cat([x.mean(dims)[None], hist_mean])
    variances = torch.cat([x.var(dims, unbiased=False)[None], hist_var])
    k = keep.sum()
    mean = means[keep].sum(0) / k
    var = (variances.clamp(min=0) + (means - mean)**2)[keep].sum(0) / k
    shape = (1, -1) + (1, ) * (x.dim() - 2)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + EPS)
    if weight is not None:
        y = y * weight.view(shape) + bias.view(shape)
    return y


def case(dtype, channels_last, history, affine, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 4, 6, generator=gen, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = bias = None
    if affine:
        weight = 0.5 + torch.rand(5, generator=gen, dtype=dtype)
        bias = torch.randn(5, generator=gen, dtype=dtype)
    # an entry with count 0 (ignored) among the earlier ones
    hist_count = torch.tensor([72., 0., 36.][:history], dtype=dtype)
    hist_mean = torch.randn(history, 5, generator=gen, dtype=dtype)
    hist_var = torch.rand(history, 5, generator=gen, dtype=dtype)
    grad = torch.randn(x.shape, generator=gen, dtype=dtype)
    return x, weight, bias, (hist_count, hist_mean, hist_var), grad


def grads(fn, x, weight, bias, grad):
    leaves = [t.detach().clone().requires_grad_()
              for t in (x, weight, bias) if t is not None]
    y = fn(*leaves) if weight is not None else fn(leaves[0], None, None)
    return y, torch.autograd.grad(y, leaves, grad)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('history', [0, 1, 3])
@pytest.mark.parametrize('affine', [True, False])
def test_both_backward_paths_match_autograd(dtype, channels_last, history,
                                            affine):
    x, weight, bias, hist, grad = case(dtype, channels_last, history,
                                       affine, seed=history)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else \
        dict(rtol=1e-4, atol=1e-5)

    def cbn(source):

        def fn(x, weight, bias):
            mean, var = batch_stats(x)
            return window_norm(x, weight, bias, mean, var, *hist, EPS,
                               source)[0]

        return fn

    y_ref, ref = grads(
        lambda x, w, b: autograd_reference(x, w, b, *hist), x, weight, bias,
        grad)
    for source in (StatsSource(), OneProcessSource()):
        y, got = grads(cbn(source), x, weight, bias, grad)
        torch.testing.assert_close(y, y_ref, **tol)
        assert y.is_contiguous(memory_format=torch.channels_last) == \
            channels_last or x.shape[2:] == (1, 1)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize('need', ['x', 'w', 'x+w'])
def test_partial_gradients(need):
    """Only the gradients autograd asks for are computed, and they are the
    full computation's."""
    x, weight, bias, hist, grad = case(torch.float64, False, 3, True, 7)
    mean, var = batch_stats(x)
    leaves = dict(x=x.clone().requires_grad_('x' in need),
                  w=weight.clone().requires_grad_('w' in need),
                  b=bias.clone())
    y = window_norm(leaves['x'], leaves['w'], leaves['b'], mean, var,
                    *hist, EPS)[0]
    wanted = [leaves[k] for k in ('x', 'w') if k in need]
    got = torch.autograd.grad(y, wanted, grad)
    _, full = grads(lambda x, w, b: window_norm(
        x, w, b, *batch_stats(x), *hist, EPS)[0], x, weight, bias, grad)
    by_name = dict(zip(('x', 'w', 'b'), full))
    for k, g in zip([k for k in ('x', 'w') if k in need], got):
        torch.testing.assert_close(g, by_name[k], rtol=1e-12, atol=1e-12)
