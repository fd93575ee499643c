# Copyright (c) mmcbn contributors. All rights reserved.
"""Normalization with window-averaged statistics (the CBN forward/backward).

Every statistic that enters a CBN layer's normalization is an *entry*: a
sample count ``n_e``, a per-channel mean ``mu_e`` and a per-channel variance
``v_e = nu_e - mu_e^2`` (for a compensated entry ``nu_e`` is a first-order
estimate, so ``v_e`` may be negative). Entry 0 is the current batch; the
others are the compensated statistics of earlier iterations, one per lag.
Entries with ``n_e = 0`` do not count. With ``K`` counted entries::

    mu_bar  = mean_e mu_e
    var_bar = mean_e max(v_e, 0) + mean_e (mu_e - mu_bar)^2
            = mean_e max(nu_e, mu_e^2) - mu_bar^2

which is the method's window average, in the numerically safer form.

Where the entries come from is a *statistics source* (:mod:`.stats_source`):
this process alone (CBN) or all processes (SyncCBN), combined exactly from
``(n, n mu, n nu)`` sums before the repair and the average.

The input gradient flows through the current entry only. Since
``d mu_bar / d x_i = 1 / (K n_0)`` and ``d var_bar / d x_i =
2 (x_i - mu_bar) / (K n_0)``, it is BatchNorm's with mean ``mu_bar``,
inverse std ``(var_bar + eps)^-1/2`` and sample count ``K n_0``. So the
forward and backward run BatchNorm's own kernels with given statistics:
``native_batch_norm`` in eval form for the output, and on CUDA the kernels
``SyncBatchNorm`` uses (``batch_norm_stats``, ``batch_norm_backward_reduce``,
``batch_norm_backward_elemt``). With the window rule (:class:`WindowGrad`,
method note "Gradients") the same backward also sends the gradients of
``mu_bar`` and ``var_bar``, in closed form, into the producer's current
parameters through the past entries. No step converts a tensor to a Python
value.
"""
import contextlib
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .stats_source import LOCAL, StatsSource


def autocast_off(device_type: str):
    """A context in which autocast is off on ``device_type``: statistics,
    counts and window state stay float32 whatever the caller's autocast.
    No context where autocast is off already (entering one costs
    microseconds, per layer and step)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


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


@torch.no_grad()
def batch_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` in the stats dtype, in
    BatchNorm's own statistics kernel; zeros for an empty batch."""
    dtype = stats_dtype(x)
    channels = x.shape[1]
    if x.numel() == 0:
        zeros = x.new_zeros(channels, dtype=dtype)
        return zeros, zeros.clone()
    if x.is_cuda:
        return welford_stats(x)
    xs = x if x.dtype == dtype else x.to(dtype)
    return torch.batch_norm_update_stats(xs, None, None, 0.0)


#: The epsilon :func:`welford_stats` passes and takes back out: tiny, so
#: that taking it out loses nothing of a normal variance, and > 0, so that
#: a constant channel's inverse std stays finite.
_WELFORD_EPS = 1e-30


def welford_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance from ``torch.batch_norm_stats`` (CUDA's
    one-pass Welford kernel, float accumulation for half inputs).

    The kernel returns ``invstd = (var + eps)^-1/2``, and ``0`` where
    ``var + eps`` is 0: with ``eps = 0`` a constant channel would come back
    as an infinite variance. A tiny ``eps`` is passed and taken out again.
    """
    dtype = stats_dtype(x)
    mean, invstd = torch.batch_norm_stats(x, _WELFORD_EPS)
    var = (invstd.to(dtype).pow(-2) - _WELFORD_EPS).clamp_(min=0)
    return mean.to(dtype), var


def normalize(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
              mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """``weight * (x - mean) / sqrt(var + eps) + bias`` in one fused pass
    (BatchNorm's eval kernel with the given statistics).

    The CPU kernel wants the affine parameters in the statistics' dtype
    when the input is half precision (a bf16/fp16 model: float32
    statistics, half weight); CUDA's reads them as they are.
    """
    if not x.is_cuda and weight is not None and weight.dtype != mean.dtype:
        weight = weight.to(mean.dtype)
        bias = None if bias is None else bias.to(mean.dtype)
    return torch.ops.aten.native_batch_norm(x, weight, bias, mean, var,
                                            False, 0.0, eps)[0]


class WindowStats(NamedTuple):
    """The statistics a window normalization combined and used (no grad).

    ``count``/``mean``/``var`` are the entries after combination over
    processes (entry 0: the current batch; ``var`` before the repair);
    ``keep`` marks the entries that counted (``count > 0``).
    """

    count: Tensor
    mean: Tensor
    var: Tensor
    keep: Tensor
    mean_bar: Tensor
    var_bar: Tensor
    k: Tensor


def window_moments(count: Tensor, mean: Tensor, var: Tensor,
                   with_weights: bool = False,
                   first_counts: bool = False) -> tuple:
    """Average the entries with ``count > 0``, each weighted equally.

    Args:
        count (Tensor): Samples per entry, shape (E, ).
        mean (Tensor): Per-channel means, (E, C); finite, and ignored where
            count is 0.
        var (Tensor): Per-channel variances ``nu - mu^2``, (E, C), before
            the repair ``max(., 0)``; finite where count is 0.
        with_weights (bool): Also return the entries' weights ``[count >
            0] / K``.
        first_counts (bool): The caller knows that entry 0 counts (``K >=
            1``; a local batch).

    Returns:
        tuple[Tensor]: ``(mean_bar, var_bar, k, keep)`` with ``k`` (0-dim)
        the number of entries averaged and ``keep`` (E, ) the mask; and the
        weights (E, ) if asked.
    """
    keep = count > 0
    k = keep.sum(dtype=mean.dtype)
    weights = keep / (k if first_counts else k.clamp(min=1))
    # (an entry that does not count has weight 0 and finite values)
    mean_bar = torch.mv(mean.t(), weights)
    shift = mean - mean_bar
    var_bar = torch.mv(
        torch.addcmul(var.clamp(min=0), shift, shift).t(), weights)
    if with_weights:
        return mean_bar, var_bar, k, keep, weights
    return mean_bar, var_bar, k, keep


class WindowGrad(NamedTuple):
    """Where the window gradient goes (``window_grad=True``).

    ``weight``/``bias`` are the producer's live parameters (None where
    frozen or absent); ``terms`` builds the closed form
    (:class:`mmcbn.compensation.WindowGradTerms`) from the combined entries:
    ``terms(lag_weight, lag_mean, lag_pos, mean_bar, need_weight)``.
    """

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    terms: Callable
    #: Upstream compensation: the feeding norms' live ``(param, part,
    #: start, stop)`` (part 0: gamma, 1: beta; channels ``start:stop`` of
    #: the terms' ``up_grad``).
    upstream: tuple = ()


class _WindowNorm(torch.autograd.Function):
    """y = weight * (x - mean_bar) / sqrt(var_bar + eps) + bias.

    The window's statistics come in already combined (no grad): the input
    gradient flows through the current batch's statistics only, and is
    BatchNorm's with ``n_eff = K * n`` samples. With the window gradient
    (``terms`` given) the gradients ``gM = dL/dmean_bar = -gamma invstd
    sum g`` and ``gV = dL/dvar_bar = -gamma invstd^3 sum g (x - mean_bar)
    / 2`` also flow, in closed form, into the producer's parameters
    ``prod_weight``/``prod_bias`` through the past entries.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor],
                bias: Optional[Tensor], mean_bar: Tensor, var_bar: Tensor,
                n_eff: Tensor, eps: float, source: StatsSource,
                prod_weight: Optional[Tensor], prod_bias: Optional[Tensor],
                terms=None, up_slices: tuple = (), *up_params) -> Tensor:
        y = normalize(x, weight, bias, mean_bar, var_bar, eps)
        invstd = torch.rsqrt(var_bar + eps)
        ctx.save_for_backward(x, weight, mean_bar, invstd, n_eff)
        ctx.source = source
        ctx.terms = terms
        ctx.up_slices = up_slices
        ctx.prod_shapes = (None if prod_weight is None else
                           (prod_weight.shape, prod_weight.dtype),
                           None if prod_bias is None else prod_bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, mean_bar, invstd, n_eff = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_pw, need_pb = ctx.needs_input_grad[8:10]
        terms = ctx.terms if (need_pw or need_pb or any(
            ctx.needs_input_grad[12:])) else None
        source = ctx.source
        channels = x.shape[1]
        grad_x = grad_w = grad_b = None
        if x.numel() == 0:
            # nothing local to reduce; still take part in the collective
            sums = None
            if need_x:
                sums = source.sum_grad(mean_bar.new_zeros(2 * channels))
                grad_x = torch.zeros_like(x)
            if weight is not None:
                grad_w = torch.zeros_like(weight) if need_w else None
                grad_b = torch.zeros_like(weight) if need_b else None
            return (grad_x, grad_w, grad_b) + (None, ) * 5 + \
                _window_grads(ctx, terms, weight, invstd, sums)
        if not x.is_cuda and not source.distributed and \
                x.dtype == mean_bar.dtype == grad_y.dtype:
            grads, g_mean, g_var = _local_cpu_backward(
                grad_y, x, weight, mean_bar, invstd, n_eff,
                ctx.needs_input_grad[:3], terms is not None)
            return grads + (None, ) * 5 + (
                _no_param_grads(ctx) if terms is None else
                _window_param_grads(ctx, g_mean, g_var, terms))
        sums = None
        if x.is_cuda:
            grad_y = grad_y.contiguous(
                memory_format=torch.channels_last) if x.is_contiguous(
                    memory_format=torch.channels_last) else \
                grad_y.contiguous()
            sum_dy, sum_dy_xmu, grad_w, grad_b = \
                torch.batch_norm_backward_reduce(
                    grad_y, x, mean_bar, invstd, weight,
                    need_x or terms is not None,
                    need_w and weight is not None,
                    need_b and weight is not None)
        else:
            # one fused reduction pass: sum g and sum g (x - mean_bar)
            _, sum_dy_xmu, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_y, x, None, None, None, mean_bar,
                torch.ones_like(invstd), True, 0.0, [False, True, True])
            if weight is not None:
                grad_w = (sum_dy_xmu * invstd).to(weight.dtype)
                grad_b = sum_dy.to(weight.dtype)
        if need_x:
            sums = source.sum_grad(torch.cat([sum_dy, sum_dy_xmu]))
            sum_dy, sum_dy_xmu = sums[:channels], sums[channels:]
            grad_x = _input_grad(grad_y, x, weight, mean_bar, invstd, sum_dy,
                                 sum_dy_xmu, n_eff)
        elif terms is not None:  # (the producer's output needs no grad)
            sums = torch.cat([sum_dy, sum_dy_xmu])
        if not need_w:
            grad_w = None
        if not need_b:
            grad_b = None
        return (grad_x, grad_w, grad_b) + (None, ) * 5 + \
            _window_grads(ctx, terms, weight, invstd, sums)


def _window_grads(ctx, terms, weight: Optional[Tensor], invstd: Tensor,
                  sums: Optional[Tensor]) -> tuple:
    """:func:`_window_param_grads` from the (combined) sums ``[sum g, sum
    g (x - mean_bar)]``: ``dL/dmean_bar = -gamma invstd sum g`` and
    ``dL/dvar_bar = -gamma invstd^3 sum g (x - mean_bar) / 2``."""
    if terms is None or sums is None:
        return _no_param_grads(ctx)
    channels = invstd.shape[0]
    gamma = invstd if weight is None else weight.to(invstd.dtype) * invstd
    g_mean = -gamma * sums[:channels].to(invstd.dtype)
    g_var = -0.5 * gamma * invstd.square() * sums[channels:].to(
        invstd.dtype)
    return _window_param_grads(ctx, g_mean, g_var, terms)


def _no_param_grads(ctx) -> tuple:
    """No gradient for the producer's and feeding norms' parameters (the
    authors' rule, or none needed)."""
    return (None, ) * (4 + len(ctx.up_slices))


def _window_param_grads(ctx, g_mean: Optional[Tensor],
                        g_var: Optional[Tensor], terms=None) -> tuple:
    """The window gradient into the producer's weight and bias and the
    feeding norms' parameters (and None for ``terms`` and ``up_slices``),
    from ``g_mean = dL/dmean_bar`` and ``g_var = dL/dvar_bar`` (all None
    without the window rule)."""
    if terms is None or g_mean is None:
        return _no_param_grads(ctx)
    channels = g_mean.shape[0]
    w_info, b_dtype = ctx.prod_shapes
    grad_pw = grad_pb = None
    if w_info is not None and ctx.needs_input_grad[8] and \
            terms.V is not None:
        grad = terms.V * g_var.unsqueeze(1)
        groups = terms.U.shape[0]
        grad.view(groups, channels // groups, -1).addcmul_(
            terms.U.unsqueeze(1), g_mean.view(groups, -1, 1))
        grad_pw = grad.reshape(w_info[0]).to(w_info[1])
    if b_dtype is not None and ctx.needs_input_grad[9] and \
            terms.bu is not None:
        grad_pb = (g_mean * terms.bu + g_var * terms.bv).to(b_dtype)
    up_grads = ()
    if ctx.up_slices:
        up_grads = (None, ) * len(ctx.up_slices)
        if terms.up_grad is not None:
            grad_up = terms.up_grad(g_mean, g_var)  # (2, C_f)
            up_grads = tuple(
                grad_up[part, start:stop].to(dtype) if need else None
                for (part, start, stop, dtype), need in zip(
                    ctx.up_slices, ctx.needs_input_grad[12:]))
    return (grad_pw, grad_pb, None, None) + up_grads


def _local_cpu_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor],
                        mean: Tensor, invstd: Tensor, n_eff: Tensor,
                        needs: Tuple[bool, bool, bool],
                        need_window: bool = False) -> tuple:
    """The backward of a local window normalization on CPU in two passes.

    With ``K = n_eff / n`` entries of ``n`` samples, the input gradient is
    ``gamma invstd (g - S_g / (K n) - (x - mean) invstd^2 S_gx / (K n))``.
    BatchNorm's backward kernel, given ``mean``, ``invstd`` and the weight
    ``gamma / K``, computes ``1/K`` of it (its sums ``S_g``, ``S_gx`` and
    the element-wise part in one loop per channel); the rest of the ``g``
    term, ``(1 - 1/K) gamma invstd g``, is one more pass. The parameter
    gradients it returns do not depend on the weight passed, and are the
    sums themselves: ``S_gx invstd`` and ``S_g``.

    Returns:
        tuple: ``((grad_x, grad_w, grad_b), g_mean, g_var)`` with the
        gradients of the window statistics ``g_mean = -gamma invstd S_g``
        and ``g_var = -gamma invstd^3 S_gx / 2`` (None unless
        ``need_window``).
    """
    need_x, need_w, need_b = needs
    n = x.numel() // x.shape[1]
    gamma = invstd.new_ones(invstd.shape) if weight is None else \
        weight.to(invstd.dtype)
    gamma_k = torch.div(gamma, n_eff).mul_(n)  # gamma / K
    has_w = weight is not None
    grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
        grad_y, x, gamma_k, None, None, mean, invstd, True, 0.0, [
            need_x, (need_w and has_w) or need_window,
            (need_b and has_w) or need_window
        ])
    scale = gamma * invstd
    if need_x:
        grad_x.addcmul_(grad_y, channel_view(scale - gamma_k * invstd, x))
    else:
        grad_x = None
    g_mean = g_var = None
    if need_window:  # (grad_w = S_gx invstd, grad_b = S_g)
        g_mean = (scale * grad_b).neg_()
        g_var = (scale * grad_w).mul_(invstd).mul_(-0.5)
    if has_w:
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(weight.dtype) if need_b else None
    else:
        grad_w = grad_b = None
    return (grad_x, grad_w, grad_b), g_mean, g_var


def _input_grad(grad_y: Tensor, x: Tensor, weight: Optional[Tensor],
                mean: Tensor, invstd: Tensor, sum_dy: Tensor,
                sum_dy_xmu: Tensor, count: Tensor) -> Tensor:
    """BatchNorm's input gradient with ``count`` samples::

        gamma invstd (g - sum_dy / count
                      - (x - mean) invstd^2 sum_dy_xmu / count)
    """
    if x.is_cuda:
        gamma = weight.to(mean.dtype) if weight is not None else None
        counts = count.round().to(torch.int32).reshape(1)
        return torch.batch_norm_backward_elemt(grad_y, x, mean, invstd,
                                               gamma, sum_dy, sum_dy_xmu,
                                               counts)
    count = count.clamp(min=1)
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    slope = -scale * invstd.square() * sum_dy_xmu / count
    offset = -scale * sum_dy / count
    dtype = mean.dtype
    xs = x if x.dtype == dtype else x.to(dtype)
    # slope (x - mean) + offset in one pass (eps 0, unit variance: exact)
    grad = torch.ops.aten.native_batch_norm(xs, slope, offset, mean,
                                            torch.ones_like(mean), False,
                                            0.0, 0.0)[0]
    grad.addcmul_(grad_y, channel_view(scale, xs))
    return grad.to(x.dtype)


def window_norm(x: Tensor,
                weight: Optional[Tensor],
                bias: Optional[Tensor],
                cur_mean: Tensor,
                cur_var: Tensor,
                hist_count: Tensor,
                hist_mean: Tensor,
                hist_var: Tensor,
                eps: float,
                source: StatsSource = LOCAL,
                window_grad: Optional[WindowGrad] = None
                ) -> Tuple[Tensor, WindowStats]:
    """Normalize ``x`` with the window statistics.

    Args:
        x (Tensor): Input of shape (N, C, *); N may be 0.
        weight (Tensor, optional): Affine scale, shape (C, ).
        bias (Tensor, optional): Affine shift, shape (C, ).
        cur_mean (Tensor): This process's batch mean (stats dtype), (C, ).
        cur_var (Tensor): Its biased variance, (C, ).
        hist_count (Tensor): Samples of each earlier entry, (L, ); 0 for an
            entry that does not count.
        hist_mean (Tensor): Their compensated means, (L, C).
        hist_var (Tensor): Their compensated ``nu - mu^2``, (L, C).
        eps (float): Added to the variance inside the square root.
        source (StatsSource): Where the entries are combined.
        window_grad (WindowGrad, optional): Let the gradient of the window
            statistics flow into the producer's parameters through the
            past entries (the window rule); None: the authors' rule.

    Returns:
        tuple: The normalized output (dtype of ``x``) and the
        :class:`WindowStats` it used.
    """
    if not torch.is_grad_enabled():
        window_grad = None
    with autocast_off(x.device.type):
        with torch.no_grad():
            m = x.numel() // x.shape[1] if x.shape[1] else 0
            count = torch.nn.functional.pad(hist_count, (1, 0), value=m)
            mean = torch.cat([cur_mean.unsqueeze(0), hist_mean])
            var = torch.cat([cur_var.unsqueeze(0), hist_var])
            count, mean, var = source.combine(count, mean, var)
            # (entry 0 counts where it is a non-empty local batch)
            mean_bar, var_bar, k, keep, weights = window_moments(
                count, mean, var, with_weights=True,
                first_counts=m > 0 and not source.distributed)
            # the input gradient is BatchNorm's with K * n_0 samples
            n_eff = k * count[0]
            prod_weight = prod_bias = terms = None
            up_slices, up_params = (), ()
            if window_grad is not None:
                prod_weight, prod_bias = window_grad.weight, window_grad.bias
                terms = _window_grad_terms(window_grad, source, hist_count,
                                           count, mean, var, keep, k,
                                           weights, mean_bar)
                up_params = tuple(p for p, *_ in window_grad.upstream)
                up_slices = tuple((part, start, stop, p.dtype)
                                  for p, part, start, stop in
                                  window_grad.upstream)
        y = _WindowNorm.apply(x, weight, bias, mean_bar, var_bar, n_eff, eps,
                              source, prod_weight, prod_bias, terms,
                              up_slices, *up_params)
    return y, WindowStats(count, mean, var, keep, mean_bar, var_bar, k)


def _window_grad_terms(window_grad: WindowGrad, source: StatsSource,
                       local_count: Tensor, count: Tensor, mean: Tensor,
                       var: Tensor, keep: Tensor, k: Tensor, weights: Tensor,
                       mean_bar: Tensor):
    """The entry weights of this process's past entries (``1/K`` times its
    share of each combined entry, which is 1 for a local source) and the
    closed-form terms."""
    if source.distributed:
        # (a sample count is 0 or >= 1; an entry nobody counts has weight
        # 0 and local count 0)
        lag_weight = (local_count / count[1:].clamp(min=1)).mul_(
            weights[1:])
    else:
        lag_weight = weights[1:]
    need_weight = window_grad.weight is not None and \
        window_grad.weight.requires_grad
    return window_grad.terms(lag_weight, mean[1:], var[1:] >= 0, mean_bar,
                             need_weight, bool(window_grad.upstream))
