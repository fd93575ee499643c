# Copyright (c) mmcbn contributors. All rights reserved.
"""A slow, independent CBN written straight from the paper, for tests only.

It shares no code with :mod:`mmcbn`: the producer is given explicitly, past
statistics are recomputed from stored producer inputs and parameter
snapshots, the Taylor terms come from ``torch.func.jvp`` (forward-mode
autograd) at the recorded parameters instead of closed forms, and the
normalization is written with plain autograd ops in the ``nu - mu^2`` form of
the method document.
"""
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp


def _moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    dims = [d for d in range(x.dim()) if d != 1]
    return x.mean(dims), (x * x).mean(dims)


class ReferenceCBN(nn.Module):
    """CBN of the method document, bound to ``producer`` explicitly.

    Call as ``ref(producer_input)``: it runs the producer itself, so it can
    record the producer's input and parameters.
    """

    def __init__(self,
                 producer: nn.Module,
                 num_features: int,
                 window: int,
                 burnin: int = 0,
                 eps: float = 1e-5,
                 momentum: float = 0.1,
                 compensate: bool = True,
                 running_stats_from: str = 'batch'):
        super().__init__()
        self.running_stats_from = running_stats_from
        self.producer = producer
        self.window, self.burnin, self.eps = window, burnin, eps
        self.momentum, self.compensate = momentum, compensate
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer('running_mean', torch.zeros(num_features))
        self.register_buffer('running_var', torch.ones(num_features))
        self.iteration = -1
        self.history: List[Tuple[int, Tensor, Dict[str, Tensor]]] = []

    def _trainable(self) -> Dict[str, Tensor]:
        return {
            n: p.detach().clone()
            for n, p in self.producer.named_parameters() if p.requires_grad
        }

    def _stats_at(self, inp: Tensor, params_then: Dict[str, Tensor],
                  params_now: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        """First-order estimate of (mu, nu) of ``inp`` under params_now."""

        def stats(params):
            return _moments(functional_call(self.producer, params, (inp, )))

        if not params_then or not self.compensate:
            return stats(params_then)
        delta = {n: params_now[n] - params_then[n] for n in params_then}
        (mu, nu), (dmu, dnu) = jvp(stats, (params_then, ), (delta, ))
        return mu + dmu, nu + dnu

    def forward(self, inp: Tensor) -> Tensor:
        x = self.producer(inp)
        if not self.training:
            shape = (1, -1) + (1, ) * (x.dim() - 2)
            return (x - self.running_mean.view(shape)) / torch.sqrt(
                self.running_var.view(shape) + self.eps) * self.weight.view(
                    shape) + self.bias.view(shape)
        self.iteration += 1
        t = self.iteration
        k = 1 if t < self.burnin else self.window
        mu_t, nu_t = _moments(x)
        mus, nus = [mu_t], [torch.maximum(nu_t, mu_t * mu_t)]
        now = self._trainable()
        with torch.no_grad():
            for s, old_inp, then in self.history:
                if 1 <= t - s <= k - 1:
                    mu, nu = self._stats_at(old_inp, then, now)
                    mus.append(mu)
                    nus.append(torch.maximum(nu, mu * mu))
        mu_bar = torch.stack(mus).mean(0)
        nu_bar = torch.stack(nus).mean(0)
        var = torch.clamp(nu_bar - mu_bar * mu_bar, min=0)
        shape = (1, -1) + (1, ) * (x.dim() - 2)
        y = (x - mu_bar.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        y = y * self.weight.view(shape) + self.bias.view(shape)
        with torch.no_grad():
            if self.running_stats_from == 'window':
                # the statistics normalized with, over len(mus) batches
                m = len(mus) * (x.numel() // x.shape[1])
                new_mean, new_var = mu_bar, var * m / (m - 1)
            else:
                m = x.numel() // x.shape[1]
                new_mean, new_var = mu_t, (nu_t - mu_t * mu_t) * m / (m - 1)
            self.running_mean.mul_(1 - self.momentum).add_(
                self.momentum * new_mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum *
                                                          new_var)
        self.history.append((t, inp.detach().clone(), now))
        self.history = self.history[-max(self.window, 1):]
        return y
