# Copyright (c) mmcbn contributors. All rights reserved.
"""Moving Average Batch Normalization (MABN), a batch-2 baseline.

Yan et al., "Towards Stabilizing Batch Statistics in Backward Propagation of
Batch Normalization", ICLR 2020, written from the paper's equations. Per
channel, over the ``M`` positions of a training batch at iteration ``t``:

- forward: the batch's second moment ``chi2_t = E[x^2]`` (no mean: the
  convolutions feeding MABN centre their weights, :class:`mmcbn.ConvWC`).
  ``sigma2`` is the simple moving average of ``chi2`` over the last
  ``buffer_size`` iterations (the current one included);
  ``z = x / sqrt(sigma2 + eps)``;
- output: ``y = weight * r * z + bias`` with the Batch-Renorm factor
  ``r = sqrt(sigma2 + eps) / sqrt(running_var + eps)`` (a constant in the
  backward), 1 during ``renorm_warmup`` iterations and clipped to
  ``[1 / r_max, r_max]`` after. ``running_var`` is an EMA of ``sigma2``
  (``momentum``, torch's convention: ``0.02`` keeps 0.98 of the old value)
  and is what eval mode normalizes with;
- backward: ``g_z = weight * r * dL/dy``, ``psi_t = E[g_z * z]``, replaced
  by its simple moving average ``psi_bar`` over the same iterations:
  ``dL/dx = (g_z - z * psi_bar) / sqrt(sigma2 + eps)``.

During the first ``sma_warmup`` iterations ``sigma2 = chi2_t`` and
``psi_bar = psi_t`` (the batch's own; the backward is then exact), while
both are recorded, so the averages are full when the warm-up ends.

In eval mode MABN is BatchNorm with ``running_mean = 0``: same parameters,
same BN buffers (the moving-average buffers ``mabn_chi``/``mabn_psi`` are
extra), so :mod:`mmcbn.export` turns it into a stock BN layer exactly.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import Tensor, nn

from .binding import in_backward
from .functional import autocast_off, channel_view, reduce_dims
from .options import check_int, is_number

#: State-dict key suffixes of MABN's moving-average buffers, which a stock
#: BatchNorm layer does not have (dropped by the export).
MABN_ONLY_BUFFERS = ('mabn_chi', 'mabn_psi')


def _check_mabn_args(eps, momentum, buffer_size, sma_warmup, renorm_warmup,
                     r_max) -> None:
    if not is_number(eps) or eps <= 0:
        raise ValueError(f'MABN eps must be a number > 0, got {eps!r}')
    if not is_number(momentum) or not 0 < momentum <= 1:
        raise ValueError('MABN momentum must be a number in (0, 1] '
                         f'(torch convention: 0.02 keeps 0.98), got '
                         f'{momentum!r}')
    check_int('buffer_size', buffer_size, 1, 'MABN')
    check_int('sma_warmup', sma_warmup, 0, 'MABN')
    check_int('renorm_warmup', renorm_warmup, 0, 'MABN')
    if not is_number(r_max) or r_max < 1:
        raise ValueError(f'MABN r_max must be a number >= 1, got {r_max!r}')


class _MABNFunction(torch.autograd.Function):
    """``y = weight * r * x * inv_std + bias`` with MABN's backward.

    The backward writes this batch's ``psi`` into ``psi_history[slot]``
    and uses the mean of the history's ``count`` filled rows (``use_sma``)
    or ``psi`` itself.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, inv_std, r, psi_history, slot, count,
                use_sma):
        dtype = inv_std.dtype
        gain = inv_std if r is None else inv_std * r
        if weight is not None:
            gain = gain * weight.to(dtype)
        y = x.to(dtype) * channel_view(gain, x)
        if bias is not None:
            y = y + channel_view(bias.to(dtype), x)
        ctx.save_for_backward(x, weight)
        ctx.inv_std, ctx.r, ctx.psi_history = inv_std, r, psi_history
        ctx.slot, ctx.count, ctx.use_sma = slot, count, use_sma
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        inv_std, r = ctx.inv_std, ctx.r
        dtype = inv_std.dtype
        dims = reduce_dims(x)
        with autocast_off(x.device.type):
            g = grad.to(dtype)
            z = x.to(dtype) * channel_view(inv_std, x)
            g_r = g if r is None else g * channel_view(r, x)
            g_z = g_r if weight is None else g_r * channel_view(
                weight.to(dtype), x)
            psi = (g_z * z).mean(dims)
            history = ctx.psi_history
            history[ctx.slot].copy_(psi)
            psi_bar = (history[:ctx.count].sum(0) / ctx.count
                       if ctx.use_sma else psi)
            dx = (g_z - z * channel_view(psi_bar, x)) * channel_view(
                inv_std, x)
            dweight = None if weight is None or not ctx.needs_input_grad[1] \
                else (g_r * z).sum(dims).to(weight.dtype)
            dbias = None if ctx.bias_dtype is None or \
                not ctx.needs_input_grad[2] else g.sum(dims).to(ctx.bias_dtype)
        return (dx.to(x.dtype), dweight, dbias, None, None, None, None, None,
                None)


class MABN2d(nn.BatchNorm2d):
    """Moving Average Batch Normalization over a 4D input (N, C, H, W).

    Use it with weight-centred convolutions (``conv_cfg=dict(type=
    'ConvWC')``), as the paper does: MABN does not subtract a mean.

    Args:
        num_features (int): Number of channels ``C``.
        eps (float): Added to ``sigma2`` inside the square root. Defaults to
            1e-5.
        momentum (float): Weight of the new ``sigma2`` in the EMA
            ``running_var`` (torch's convention; the paper's 0.98 decay is
            0.02). Defaults to 0.02.
        affine (bool): Learnable ``weight`` and ``bias``. Defaults to True.
        buffer_size (int): Iterations of the simple moving averages of
            ``chi2`` and ``psi`` (the current one included): the batch to
            simulate over the batch per GPU, 32 / 2 = 16. Defaults to 16.
        sma_warmup (int): Training iterations that use the batch's own
            ``chi2`` and ``psi``. Defaults to 100.
        renorm_warmup (int): Training iterations with ``r = 1``. Defaults to
            1000.
        r_max (float): ``r`` is clipped to ``[1 / r_max, r_max]``. Defaults
            to 5.

    Each training-mode call is one iteration of the moving averages (the
    iteration count is ``num_batches_tracked``, saved with the state).
    Statistics, histories and ``running_var`` stay float32 under autocast
    (float64 for a float64 model).
    """

    _abbr_ = 'bn'
    #: Precise re-estimation pools only E[x^2] into ``running_var``
    #: (mmcbn.precise_stats): MABN normalizes without a mean.
    second_moment_only = True

    def __init__(self,
                 num_features: int,
                 eps: float = 1e-5,
                 momentum: float = 0.02,
                 affine: bool = True,
                 buffer_size: int = 16,
                 sma_warmup: int = 100,
                 renorm_warmup: int = 1000,
                 r_max: float = 5.0,
                 device=None,
                 dtype=None) -> None:
        _check_mabn_args(eps, momentum, buffer_size, sma_warmup,
                         renorm_warmup, r_max)
        super().__init__(num_features, eps, momentum, affine, True, device,
                         dtype)
        self.buffer_size = buffer_size
        self.sma_warmup = sma_warmup
        self.renorm_warmup = renorm_warmup
        self.r_max = float(r_max)
        sdtype = torch.float64 if dtype == torch.float64 else torch.float32
        for name in MABN_ONLY_BUFFERS:
            self.register_buffer(
                name,
                torch.zeros(buffer_size, num_features, device=device,
                            dtype=sdtype))
        #: Training iterations so far, on the host (``num_batches_tracked``
        #: mirrors it on the device; a load sets it from there).
        self._steps = 0
        #: What the last training forward used, for an activation-
        #: checkpointing recomputation of it.
        self._last: Optional[tuple] = None

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, buffer_size={self.buffer_size}, '
                f'sma_warmup={self.sma_warmup}, '
                f'renorm_warmup={self.renorm_warmup}, r_max={self.r_max}')

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f'MABN2d expects a 4D input (N, C, H, W), got a '
                             f'{x.dim()}D input of shape {tuple(x.shape)}')
        if x.shape[1] != self.num_features:
            raise ValueError(
                f'MABN2d has num_features={self.num_features} but its input '
                f'has {x.shape[1]} channels (shape {tuple(x.shape)})')

    def _statistics(self, x: Tensor) -> tuple:
        """This iteration's ``inv_std``, ``r`` and history slot; updates
        ``mabn_chi``, ``running_var`` and the iteration count."""
        t = self._steps
        slot, count = t % self.buffer_size, min(t + 1, self.buffer_size)
        use_sma = t >= self.sma_warmup
        dtype = self.mabn_chi.dtype
        with torch.no_grad(), autocast_off(x.device.type):
            xs = x.detach().to(dtype)
            chi = (xs * xs).mean(reduce_dims(x))
            self.mabn_chi[slot].copy_(chi)
            var = self.mabn_chi[:count].sum(0) / count if use_sma else chi
            inv_std = torch.rsqrt(var + self.eps)
            r = None
            if t >= self.renorm_warmup:
                r = (torch.rsqrt(self.running_var.to(dtype) + self.eps) /
                     inv_std).clamp_(1 / self.r_max, self.r_max)
            self.running_var.mul_(1 - self.momentum).add_(
                var.to(self.running_var.dtype), alpha=self.momentum)
            self.num_batches_tracked.add_(1)
        self._steps = t + 1
        return inv_std, r, slot, count, use_sma

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training:
            return super().forward(x)  # BatchNorm with running_mean 0
        if x.numel() == 0:
            # an empty batch (an RoI head without RoIs): empty output,
            # nothing recorded, as BatchNorm leaves its statistics
            return F.batch_norm(x, None, None, self.weight, self.bias, True,
                                0.0, self.eps)
        if in_backward() and self._last is not None:
            stats = self._last  # an activation-checkpointing recomputation
        else:
            stats = self._last = self._statistics(x)
        inv_std, r, slot, count, use_sma = stats
        return _MABNFunction.apply(x, self.weight, self.bias, inv_std, r,
                                   self.mabn_psi, slot, count, use_sma)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata,
                              strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # (at load time, not in training: reading the count is fine here)
        self._steps = int(self.num_batches_tracked)
        self._last = None


class ConvWC(nn.Conv2d):
    """A 2d convolution that centres each output filter of its weight in
    ``forward``: ``W - mean(W[j])`` over the input channels and kernel
    positions of filter ``j`` (MABN's weight centralization; mmcv's
    ``ConvWS`` also divides by the std).

    The parameter is kept as it is (so a resumed run is bit-exact); the
    persistent marker buffer ``weight_centred`` tells :mod:`mmcbn.export`
    to publish the centred weight for a plain ``nn.Conv2d``. Registered in
    ``MODELS`` as ``'ConvWC'`` for ``conv_cfg=dict(type='ConvWC')``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer('weight_centred',
                             torch.ones((), dtype=torch.uint8))

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, centre_filters(self.weight), self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata,
                              strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # a plain convolution's checkpoint (pretrained weights) has no
        # marker: it loads as it is
        state_dict.setdefault(prefix + 'weight_centred',
                              self.weight_centred.clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)


def centre_filters(weight: Tensor) -> Tensor:
    """``weight`` with each output filter's mean removed (what
    :class:`ConvWC` convolves with)."""
    return weight - weight.mean(dim=tuple(range(1, weight.dim())),
                                keepdim=True)


MABN = MABN2d
MODELS.register_module('MABN', module=MABN2d)
MODELS.register_module('MABN2d', module=MABN2d)
MODELS.register_module('ConvWC', module=ConvWC)
