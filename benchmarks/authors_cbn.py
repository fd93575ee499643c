# Copyright (c) mmcbn contributors. All rights reserved.
"""The authors' way of computing CBN, reimplemented for benchmarking.

Written by us from the description of their computation (no code copied):
per layer and iteration, two ``torch.autograd.grad`` calls give the
gradients of the per-channel mean and second moment with respect to the
whole weight (the mean gradient is thereby stored once per output channel),
and every window entry keeps a copy of the weight, so an entry holds three
weight-sized tensors. Normalization is written with plain autograd ops.
Only the speed and memory of this layer are of interest; its statistics are
those of the paper (with mmcbn's max() repair, for a like-for-like cost).
"""
from collections import deque

import torch
from torch import nn

from mmcbn.binding import find_producer


class AuthorsCBN2d(nn.BatchNorm2d):
    """CBN computed with two autograd.grad calls per iteration."""

    def __init__(self, num_features, window=8, eps=1e-5, momentum=0.1,
                 **kwargs):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.window = window
        self.history = deque(maxlen=max(window - 1, 0))

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims = (0, 2, 3)
        mean_t = x.mean(dims)
        nu_t = (x * x).mean(dims)
        binding = find_producer(x)
        weight = None
        if binding.status == 'bound':
            node = binding.producer.node
            weight = node.next_functions[1][0].variable
        entries_mean, entries_nu = [mean_t], [nu_t]
        if weight is not None:
            w_now = weight.detach()
            for w_old, mean_old, nu_old, dmean, dnu in self.history:
                delta = w_now - w_old
                mean_c = mean_old + (dmean * delta).flatten(1).sum(1)
                nu_c = nu_old + (dnu * delta).flatten(1).sum(1)
                entries_mean.append(mean_c)
                entries_nu.append(torch.maximum(nu_c, mean_c * mean_c))
        mean_bar = torch.stack(entries_mean).mean(0)
        nu_bar = torch.stack(entries_nu).mean(0)
        var = (nu_bar - mean_bar * mean_bar).clamp(min=0)
        shape = (1, -1, 1, 1)
        y = (x - mean_bar.view(shape)) / torch.sqrt(var.view(shape) +
                                                    self.eps)
        y = y * self.weight.view(shape) + self.bias.view(shape)
        with torch.no_grad():
            m = x.numel() // x.shape[1]
            var_t = nu_t - mean_t * mean_t
            self.running_mean.lerp_(mean_t, self.momentum)
            self.running_var.lerp_(var_t * m / (m - 1), self.momentum)
        if weight is not None and self.window > 1:
            ones = torch.ones_like(mean_t)
            dmean = torch.autograd.grad(mean_t, weight, ones,
                                        retain_graph=True)[0]
            dnu = torch.autograd.grad(nu_t, weight, ones,
                                      retain_graph=True)[0]
            self.history.append((weight.detach().clone(), mean_t.detach(),
                                 nu_t.detach(), dmean, dnu))
        return y

    def window_state_nbytes(self):
        return sum(t.numel() * t.element_size() for entry in self.history
                   for t in entry)
