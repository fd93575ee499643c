# Copyright (c) mmcbn contributors. All rights reserved.
"""Normalization with window-averaged statistics (the CBN forward/backward).

Given the current batch ``x`` and the compensated statistics of earlier
iterations, CBN normalizes with

.. math::

    \\bar\\mu = \\frac{1}{k}\\sum_\\tau \\mu_{t-\\tau}, \\qquad
    \\bar\\sigma^2 = \\frac{1}{k}\\sum_\\tau \\max(\\nu_{t-\\tau},
    \\mu_{t-\\tau}^2) - \\bar\\mu^2

Writing :math:`\\max(\\nu, \\mu^2) = \\mu^2 + \\max(\\nu - \\mu^2, 0)` gives
the algebraically identical, numerically safer form used here::

    var_bar = mean_e(v_e) + mean_e((mu_e - mu_bar)^2)

where ``v_e`` is each entry's (clamped) variance. The current entry's
``mu_t`` and ``v_t`` are computed from ``x`` with a two-pass variance, so for
``k = 1`` the result is exactly BatchNorm's.

Gradients flow through the current statistics only; the history is constant.
The backward pass is closed-form (two per-channel reductions and one fused
element-wise pass, like BatchNorm's), not a chain of autograd ops.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor


def reduce_dims(x: Tensor) -> Tuple[int, ...]:
    """All dimensions of ``x`` except the channel dimension 1."""
    return (0, ) + tuple(range(2, x.dim()))


def channel_view(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-channel vector so it broadcasts against ``x``."""
    return v.view((1, -1) + (1, ) * (x.dim() - 2))


def stats_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 models, float32 otherwise (fp16/bf16 included)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def batch_norm_with_stats(x: Tensor, weight: Optional[Tensor],
                          bias: Optional[Tensor],
                          eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Training-mode BatchNorm (the very kernel ``F.batch_norm`` runs) that
    also returns the batch mean and biased variance it used (stats dtype,
    no grad), with no extra pass over ``x``.
    """
    y, mean, invstd = torch.ops.aten.native_batch_norm(
        x, weight, bias, None, None, True, 0.0, eps)
    dtype = stats_dtype(x)
    mean = mean.detach().to(dtype)
    var = (invstd.detach().to(dtype).pow(-2) - eps).clamp_(min=0)
    return y, mean, var


def window_moments(mean_t: Tensor, var_t: Tensor, hist_mean: Tensor,
                   hist_var: Tensor,
                   hist_keep: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Combine the current statistics with the kept history entries.

    Args:
        mean_t (Tensor): Current mean, shape (C, ).
        var_t (Tensor): Current biased variance, shape (C, ).
        hist_mean (Tensor): Compensated means of earlier iterations,
            shape (n, C). Dropped entries must hold finite values.
        hist_var (Tensor): Their variances ``max(nu - mu^2, 0)``, (n, C).
        hist_keep (Tensor): 1 for an entry that is used, 0 for a dropped one,
            shape (n, ).

    Returns:
        tuple[Tensor]: ``(mean_bar, var_bar, k)`` where ``k`` (shape (1, ))
        is the number of entries averaged, the current one included.
    """
    keep = hist_keep.unsqueeze(1)
    k = 1 + hist_keep.sum().reshape(1)
    mean_bar = (mean_t + (keep * hist_mean).sum(0)) / k
    spread = (mean_t - mean_bar).square() + (keep * (hist_mean - mean_bar)
                                            .square()).sum(0)
    var_bar = (var_t + (keep * hist_var).sum(0) + spread) / k
    return mean_bar, var_bar, k


class _CrossIterationNorm(torch.autograd.Function):
    """y = weight * (x - mean_bar) / sqrt(var_bar + eps) + bias."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor],
                bias: Optional[Tensor], hist_mean: Tensor, hist_var: Tensor,
                hist_keep: Tensor, eps: float):
        dtype = stats_dtype(x)
        xs = x.to(dtype)
        dims = reduce_dims(xs)
        # two passes: several times faster on CPU than torch.var_mean for
        # this reduction pattern, and as accurate
        mean_t = xs.mean(dims)
        var_t = (xs - channel_view(mean_t, xs)).square_().mean(dims)
        mean_bar, var_bar, k = window_moments(mean_t, var_t, hist_mean,
                                              hist_var, hist_keep)
        invstd = torch.rsqrt(var_bar + eps)
        gamma = invstd.new_ones(()) if weight is None else weight.to(dtype)
        beta = invstd.new_zeros(()) if bias is None else bias.to(dtype)
        scale = gamma * invstd
        shift = beta - mean_bar * scale
        y = torch.addcmul(channel_view(shift, xs), xs, channel_view(scale, xs))
        ctx.save_for_backward(x, weight, bias, mean_t, mean_bar, invstd,
                              scale, k)
        ctx.mark_non_differentiable(mean_t, var_t, mean_bar, var_bar, k)
        return y.to(x.dtype), mean_t, var_t, mean_bar, var_bar, k

    @staticmethod
    def backward(ctx, grad_y: Tensor, *_grad_stats):
        x, weight, bias, mean_t, mean_bar, invstd, scale, k = \
            ctx.saved_tensors
        dtype = mean_t.dtype
        xs, gy = x.to(dtype), grad_y.to(dtype)
        dims = reduce_dims(xs)
        m = xs.numel() // xs.shape[1]
        sum_g = gy.sum(dims)
        # sum_i g_i (x_i - mean_bar), per channel
        sum_gxc = (gy * xs).sum(dims) - mean_bar * sum_g
        d_var_bar = -0.5 * invstd.square() * scale * sum_gxc
        d_mean_direct = -scale * sum_g
        # total derivatives through mean_t and var_t (history is constant)
        d_mean_t = (d_mean_direct + d_var_bar * 2 * (mean_t - mean_bar)) / k
        d_var_t = d_var_bar / k
        a = d_var_t * (2.0 / m)
        b = d_mean_t / m - a * mean_t
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addcmul(
                torch.addcmul(channel_view(b, xs), xs, channel_view(a, xs)),
                gy, channel_view(scale, xs)).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = (invstd * sum_gxc).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_b = sum_g.to(bias.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def cross_iteration_norm(
        x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
        hist_mean: Tensor, hist_var: Tensor, hist_keep: Tensor, eps: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Normalize ``x`` with statistics averaged over the window.

    Args:
        x (Tensor): Input of shape (N, C, *).
        weight (Tensor, optional): Affine scale, shape (C, ).
        bias (Tensor, optional): Affine shift, shape (C, ).
        hist_mean (Tensor): Compensated means of earlier iterations, (n, C).
        hist_var (Tensor): Their variances, (n, C).
        hist_keep (Tensor): 0/1 weights of the history entries, (n, ).
        eps (float): Added to the variance inside the square root.

    Returns:
        tuple[Tensor]: The normalized output (dtype of ``x``), the current
        batch's mean and biased variance, the window's mean and biased
        variance it normalized with, and the number of batches averaged
        (shape (1, )); all but the output in the stats dtype, no grad.
    """
    autocast_off = torch.autocast(device_type=x.device.type, enabled=False)
    with autocast_off:
        return _CrossIterationNorm.apply(x, weight, bias, hist_mean, hist_var,
                                         hist_keep, eps)
