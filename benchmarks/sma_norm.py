# Copyright (c) mmcbn contributors. All rights reserved.
"""A probe for batch2_study.py: BatchNorm with moving-average statistics,
centred or not, to tell what separates CBN from MABN at batch 2.

``SMABatchNorm2d`` normalizes a training batch with the simple moving
averages, over the last ``window`` iterations (the current one included),
of the batch mean and second moment (``center=True``) or of the second
moment only (``center=False``, MABN without its renormalization factor),
and back-propagates with moving averages of the backward statistics
``a = E[g_z]`` and ``b = E[g_z z]`` (``g_z = weight * dL/dy``)::

    dL/dx = (g_z - a_bar - z b_bar) / sigma          (centred)
    dL/dx = (g_z - z b_bar) / sigma                  (not centred)

``center_backward`` decides about ``a_bar`` on its own (default: as
``center``). The first ``warmup`` iterations use the batch's own
statistics (the exact BatchNorm gradient). Nothing is compensated: the
entries are the statistics as recorded (naive, stale by up to ``window -
1`` steps). The running statistics (eval) are an EMA (0.1) of the
normalizing ones. A benchmark probe, not a library layer: no state is
saved, no resume, no autocast handling.
"""
import torch
from torch import nn


class _SMANorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, layer, slot, use_avg):
        z = (x - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
        ctx.save_for_backward(z, weight, invstd)
        ctx.layer, ctx.slot, ctx.use_avg = layer, slot, use_avg
        return z * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, grad):
        z, weight, invstd = ctx.saved_tensors
        layer = ctx.layer
        g_z = grad * weight.view(1, -1, 1, 1)
        a, b = g_z.mean((0, 2, 3)), (g_z * z).mean((0, 2, 3))
        layer.grad_mean[ctx.slot] = a
        layer.grad_proj[ctx.slot] = b
        if ctx.use_avg:
            rows = layer.recent()
            a, b = layer.grad_mean[rows].mean(0), layer.grad_proj[rows].mean(0)
        if not layer.center_backward:
            a = torch.zeros_like(a)
        dx = (g_z - a.view(1, -1, 1, 1) - z * b.view(1, -1, 1, 1)) * \
            invstd.view(1, -1, 1, 1)
        return (dx, (grad * z).sum((0, 2, 3)), grad.sum((0, 2, 3)), None,
                None, None, None, None)


class SMABatchNorm2d(nn.BatchNorm2d):
    """See the module docstring."""

    def __init__(self, num_features, window=16, warmup=100, center=True,
                 center_backward=None):
        super().__init__(num_features)
        self.window, self.warmup, self.center = window, warmup, center
        self.center_backward = center if center_backward is None else \
            center_backward
        for name in ('means', 'moments', 'grad_mean', 'grad_proj'):
            self.register_buffer(name, torch.zeros(window, num_features))
        self.steps = 0

    def recent(self):
        """Ring rows of the last ``window`` iterations (fewer at first)."""
        t = self.steps - 1
        return [(t - i) % self.window for i in range(min(t + 1,
                                                         self.window))]

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        slot = self.steps % self.window
        self.steps += 1
        use_avg = self.steps > self.warmup
        with torch.no_grad():
            self.means[slot] = x.mean((0, 2, 3))
            self.moments[slot] = (x * x).mean((0, 2, 3))
            rows = self.recent() if use_avg else [slot]
            mean, moment = self.means[rows].mean(0), self.moments[rows].mean(
                0)
            if not self.center:
                mean = torch.zeros_like(mean)
            var = (moment - mean.square()).clamp(min=0)
            invstd = torch.rsqrt(var + self.eps)
            self.running_mean.mul_(0.9).add_(mean, alpha=0.1)
            self.running_var.mul_(0.9).add_(var, alpha=0.1)
        return _SMANorm.apply(x, self.weight, self.bias, mean, invstd, self,
                              slot, use_avg)


class SMASecondMoment2d(SMABatchNorm2d):
    """``SMABatchNorm2d(center=False)``: its eval statistics are a second
    moment (``running_mean`` 0), as MABN's, also when re-estimated."""

    second_moment_only = True

    def __init__(self, num_features, window=16, warmup=100,
                 center_backward=False):
        super().__init__(num_features, window, warmup, False,
                         center_backward)


def sma_norm(num_features, center=True, **kwargs):
    """The probe layer: centred, or second moment only."""
    if center:
        return SMABatchNorm2d(num_features, center=True, **kwargs)
    return SMASecondMoment2d(num_features, **kwargs)
