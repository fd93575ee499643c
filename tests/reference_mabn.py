# Copyright (c) mmcbn contributors. All rights reserved.
"""MABN written again from the paper's equations, in float64, for tests.

Independent of ``mmcbn.mabn``: plain Python lists hold the history (no ring
buffer, no slots), the backward is the formula written out, and nothing is
shared with the library but torch.

Iteration ``t`` (0-based), input ``x`` (N, C, H, W), upstream gradient
``g``, over the M = N*H*W positions of each channel::

    chi2_t  = E[x^2]
    sigma2  = chi2_t                        if t <  sma_warmup
            = mean(chi2 of iterations max(0, t-m+1) .. t)  otherwise
    z       = x / sqrt(sigma2 + eps)
    r       = 1                             if t <  renorm_warmup
            = clip(sqrt(sigma2+eps) / sqrt(run+eps), 1/r_max, r_max)
    y       = gamma * r * z + beta
    run    <- (1 - momentum) * run + momentum * sigma2   (after r)
    g_z     = gamma * r * g
    psi_t   = E[g_z * z]
    psi_bar = psi_t  (t < sma_warmup), else the mean of psi over the same
              iterations as sigma2
    dL/dx   = (g_z - z * psi_bar) / sqrt(sigma2 + eps)
    dgamma  = sum(g * r * z),  dbeta = sum(g)
"""
import torch


class ReferenceMABN:

    def __init__(self, channels, eps, momentum, m, sma_warmup,
                 renorm_warmup, r_max):
        self.eps, self.momentum, self.m = eps, momentum, m
        self.sma_warmup, self.renorm_warmup = sma_warmup, renorm_warmup
        self.r_max = r_max
        self.run = torch.ones(channels, dtype=torch.float64)
        self.chis, self.psis = [], []
        self.t = 0

    def step(self, x, g, gamma, beta):
        """One training iteration: returns y, dx, dgamma, dbeta."""
        x, g = x.double(), g.double()
        gamma, beta = gamma.double(), beta.double()
        dims = (0, 2, 3)
        count = x.numel() // x.shape[1]

        def per_channel(v):
            return v.view(1, -1, 1, 1)

        chi = (x * x).sum(dims) / count
        self.chis.append(chi)
        if self.t < self.sma_warmup:
            sigma2 = chi
        else:
            recent = self.chis[-self.m:]
            sigma2 = sum(recent) / len(recent)
        std = torch.sqrt(sigma2 + self.eps)
        z = x / per_channel(std)
        if self.t < self.renorm_warmup:
            r = torch.ones_like(sigma2)
        else:
            r = torch.clamp(std / torch.sqrt(self.run + self.eps),
                            1 / self.r_max, self.r_max)
        y = per_channel(gamma * r) * z + per_channel(beta)
        self.run = (1 - self.momentum) * self.run + self.momentum * sigma2
        g_z = per_channel(gamma * r) * g
        psi = (g_z * z).sum(dims) / count
        self.psis.append(psi)
        if self.t < self.sma_warmup:
            psi_bar = psi
        else:
            recent = self.psis[-self.m:]
            psi_bar = sum(recent) / len(recent)
        dx = (g_z - z * per_channel(psi_bar)) / per_channel(std)
        dgamma = (g * per_channel(r) * z).sum(dims)
        dbeta = g.sum(dims)
        self.t += 1
        return y, dx, dgamma, dbeta


def exact_grad_without_mean(x, g, gamma, beta, eps):
    """Autograd of ``gamma * x / sqrt(E[x^2] + eps) + beta`` (float64): what
    MABN's warm-up backward must equal."""
    x = x.double().detach().requires_grad_(True)
    gamma = gamma.double().detach().requires_grad_(True)
    beta = beta.double().detach().requires_grad_(True)
    chi = (x * x).mean((0, 2, 3), keepdim=True)
    y = gamma.view(1, -1, 1, 1) * x / torch.sqrt(chi + eps) + beta.view(
        1, -1, 1, 1)
    dx, dgamma, dbeta = torch.autograd.grad(y, (x, gamma, beta), g.double())
    return y.detach(), dx, dgamma, dbeta
