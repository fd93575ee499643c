# Copyright (c) mmcbn contributors. All rights reserved.
"""An independent reference of the upstream-normalization compensation.

Written from the method note ("Upstream-normalization compensation"), sharing
no code with :mod:`mmcbn.upstream`: a stored entry of the layer is
recomputed from the *normalized outputs* ``xhat`` of its feeding norms as
they were at record time, through a topology the test writes out
(``build_input``), and its first-order change comes from forward-mode
autograd (``torch.func.jvp``) in the producer's parameters and the feeding
norms' ``(gamma, beta)`` at once, with the tangents the note defines::

    kappa = clip(sqrt((max(v~, 0) + eps) / (v_tau + eps)), 1/2, 2)
    delta = mu~ - kappa mu_tau
    gamma' = gamma_t kappa s_tau / s_t
    beta'  = beta_t + gamma_t (kappa m_tau + delta - m_t) / s_t

With the window rule the tangents are built from the live ``gamma_t``,
``beta_t`` and producer parameters (the Taylor term is differentiable in
them), the statistics ``m_t``, ``s_t``, ``mu~``, ``v~`` are constants.
"""
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from reference_cbn import (count_of, moments, normalization_record,
                           normalize, window_at, window_average,
                           window_lags)

#: ``(affines [(gamma, beta)], xhats) -> the producer's input``.
BuildInput = Callable[[Sequence[tuple], Sequence[Tensor]], Tensor]


class ReferenceUpstreamCBN(nn.Module):
    """A CBN layer (training mode, batch running statistics) whose past
    entries are compensated for its producer and its feeding norms.

    Call as ``ref(producer_input)`` after the feeding norms ran this
    iteration (their ``last`` record is read).

    Args:
        producer (nn.Module): The conv/linear layer before the norm.
        num_features (int): Channels.
        window (int): ``k``.
        feeds (list[nn.Module]): The feeding reference norms (each with
            ``last``, ``weight``, ``bias``, ``eps``).
        build_input (callable): The producer's input from the feeding
            norms' affine parameters and normalized outputs.
        burnin (int): Iterations with ``k = 1``.
        eps (float): As BatchNorm.
        momentum (float): As BatchNorm.
        window_grad (bool): The window rule (True) or constant entries.
        kappa_range (tuple): The clip of ``kappa``.
    """

    def __init__(self,
                 producer: nn.Module,
                 num_features: int,
                 window: int,
                 feeds: List[nn.Module],
                 build_input: BuildInput,
                 burnin: int = 0,
                 eps: float = 1e-5,
                 momentum: float = 0.1,
                 window_grad: bool = True,
                 kappa_range=(0.5, 2.0)):
        super().__init__()
        self.producer = producer
        self.window, self.burnin, self.eps = window, burnin, eps
        self.momentum = momentum
        self.feeds = feeds
        self.build_input = build_input
        self.window_grad = window_grad
        self.kappa_range = kappa_range
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer('running_mean', torch.zeros(num_features))
        self.register_buffer('running_var', torch.ones(num_features))
        self.iteration = -1
        #: [(iteration, xhats, affines, states, params, count)]
        self.history: list = []
        self.last: Optional[dict] = None

    def _params(self, live: bool) -> dict:
        params = {n: p for n, p in self.producer.named_parameters()
                  if p.requires_grad}
        return params if live else {n: p.detach().clone()
                                    for n, p in params.items()}

    @staticmethod
    def _affine(feed: nn.Module, live: bool) -> tuple:
        gamma, beta = feed.weight, feed.bias
        return (gamma, beta) if live else (gamma.detach().clone(),
                                           beta.detach().clone())

    def _tangents(self, lag: int, affines_then, states_then, live: bool):
        """``(gamma' - gamma_tau, beta' - beta_tau)`` per feeding norm."""
        out = []
        for feed, (g_s, b_s), (m_s, s_s, mu_s, v_s) in zip(
                self.feeds, affines_then, states_then):
            last = feed.last
            mu_c, v_c = last['entries'].get(lag, (mu_s, v_s))
            kappa = torch.sqrt((torch.clamp(v_c, min=0) + feed.eps) /
                               (v_s + feed.eps)).clamp(*self.kappa_range)
            delta = mu_c - kappa * mu_s
            g_t, b_t = self._affine(feed, live)
            g_new = g_t * kappa * s_s / last['std']
            b_new = b_t + g_t * (kappa * m_s + delta - last['mean']) / \
                last['std']
            out.append((g_new - g_s, b_new - b_s))
        return out

    def forward(self, inp: Tensor) -> Tensor:
        x = self.producer(inp)
        self.iteration += 1
        t = self.iteration
        lags = set(window_lags(window_at(t, self.window, self.burnin)))
        mu_t, nu_t = moments(x)
        mus, nus = [mu_t], [nu_t]
        live = self.window_grad and torch.is_grad_enabled()
        params_at = self._params(live)
        entries = {}
        with torch.set_grad_enabled(live):
            for s, xhats, affines, states, params_then, _ in self.history:
                if t - s not in lags:
                    continue

                def stats(params, affs, xhats=xhats):
                    return moments(functional_call(
                        self.producer, params,
                        (self.build_input(affs, xhats), )))

                tangent_params = {n: params_at[n] - params_then[n]
                                  for n in params_then}
                (mu, nu), (dmu, dnu) = jvp(
                    stats, (params_then, affines),
                    (tangent_params,
                     self._tangents(t - s, affines, states, live)))
                mu, nu = mu + dmu, nu + dnu
                mus.append(mu)
                nus.append(nu)
                entries[t - s] = (mu.detach(), (nu - mu * mu).detach())
        mu_bar, var = window_average(mus, nus)
        y = normalize(x, mu_bar, var, self.eps, self.weight, self.bias)
        self.last = normalization_record(x, mu_bar, var, self.eps, mu_t,
                                         nu_t, entries)
        with torch.no_grad():
            n = count_of(x)
            self.running_mean.lerp_(mu_t, self.momentum)
            self.running_var.lerp_((nu_t - mu_t * mu_t) * n / (n - 1),
                                   self.momentum)
        self.history = [e for e in self.history
                        if t - e[0] < self.window - 1] + [
            (t, [f.last['xhat'] for f in self.feeds],
             [self._affine(f, False) for f in self.feeds],
             [(f.last['mean'], f.last['std']) + f.last['raw']
              for f in self.feeds],
             self._params(False), count_of(x))]
        return y


def compare_trajectories(ours, ref, shape, named_params, steps, optimizer,
                         loss):
    """SGD steps of two models on the same float64 batches: the outputs
    (1e-9) and the gradients of ``named_params(ours, ref)`` (``(name, a,
    b)``; 1e-7 relative) must agree at every step. ``optimizer(model)``
    builds each model's optimizer, ``loss(y, target)`` the loss."""
    gen = torch.Generator().manual_seed(1)
    opt_a, opt_b = optimizer(ours), optimizer(ref)
    for step in range(steps):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * (
            1 + step % 3)
        ya, yb = ours(x), ref(x)
        torch.testing.assert_close(ya, yb, rtol=1e-9, atol=1e-9,
                                   msg=f'output at step {step}')
        target = torch.randn(ya.shape, generator=gen, dtype=torch.float64)
        for y, opt in ((ya, opt_a), (yb, opt_b)):
            opt.zero_grad()
            loss(y, target).backward()
        for name, a, b in named_params(ours, ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-9,
                                       msg=f'{name}.grad at step {step}')
        opt_a.step()
        opt_b.step()
