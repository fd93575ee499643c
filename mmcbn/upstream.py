# Copyright (c) mmcbn contributors. All rights reserved.
"""Upstream-normalization compensation (``compensate='upstream'``).

The paper compensates a stored entry of layer ``l`` for the change of its
producer's parameters only. Each entry was also computed while the norm
layers *feeding* the producer (through ReLU gates and identity/residual
paths) normalized with their windows, affine parameters and inputs as they
stood then. This module finds those feeding norms in the autograd graph,
records what a first-order correction for them needs, and evaluates it
(method note, "Upstream-normalization compensation").

For a feeding CBN layer ``p`` reached through the ReLU gates ``a`` (their
product along the path), the producer's input holds ``a (gamma_p xhat_p +
beta_p)``, with ``xhat_p = (x_p - m_p) / s_p`` the normalized output of
``p`` before its affine. At record time ``tau`` an entry of ``l`` stores,
per channel ``j`` of ``l`` and ``c`` of ``p``::

    Hm[j, :, c] = d mean_l,j / d [gamma_p,c ; beta_p,c]
    Hc[j, :, c] = d var_l,j / d [gamma_p,c ; beta_p,c]   (centered: the
                                                          d nu - 2 mu d mu)

(a patch mean and a weight-gradient convolution of ``[a xhat_p, a]``,
contracted with the producer weight ``W_tau``), and ``p``'s state
``(gamma, beta, m, s, mu, v)`` (``mu``/``v``: ``p``'s raw batch moments).
At step ``t`` the entry of age ``i`` takes ``p``'s own compensated entry of
the same age ``(mu~, v~)``::

    kappa = clip(sqrt((max(v~, 0) + eps) / (v_tau + eps)), 1/2, 2)
    delta = mu~ - kappa mu_tau
    gamma' = gamma_t kappa s_tau / s_t
    beta'  = beta_t + gamma_t (kappa m_tau + delta - m_t) / s_t

and moves by ``Hm [gamma' - gamma_tau; beta' - beta_tau]`` (``Hc`` for the
variance). The gradient flows into ``gamma_t`` and ``beta_t``; ``m_t``,
``s_t``, ``mu~`` and ``v~`` are constants.

Every CBN call marks its output's autograd node with a :class:`NormOutput`
(references only, no copy), so a later layer of the same iteration finds
it. No step converts a tensor to a Python value.
"""
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .upstream_paths import (_KEY, MAX_FEEDING, Feeding,  # noqa: F401
                             FeedPath, PathOp, _layer_name, directions,
                             find_feeding, normalized_inputs)

#: The clip of the scale ratio ``kappa``.
KAPPA_RANGE = (0.5, 2.0)


@dataclass
class NormOutput:
    """What a CBN call normalized with, attached to its output's node.

    ``mean``/``var`` are what it normalized with (``m``; ``s = sqrt(var +
    eps)``); ``stats`` the :class:`mmcbn.functional.WindowStats` of a
    window normalization (None: the current batch only, then ``mean``/
    ``var`` are its moments): the current batch's moments and the
    compensated earlier entries (before the repair), combined over
    processes for SyncCBN. References only, no grad.
    """

    layer: object = field(repr=False)
    position: int
    x: Tensor = field(repr=False)
    mean: Tensor = field(repr=False)
    var: Tensor = field(repr=False)
    stats: object = field(default=None, repr=False)

    @property
    def std(self) -> Tensor:
        return (self.var + self.layer.eps).sqrt()

    @property
    def raw_moments(self) -> Tuple[Tensor, Tensor]:
        if self.stats is None:
            return self.mean, self.var
        return self.stats.mean[0], self.stats.var[0]


#: Whether any layer of this process asked for upstream compensation
#: (until then CBN outputs are not marked).
_in_use = False


def enable_marks() -> None:
    """Mark CBN outputs from now on (a layer with upstream compensation
    was built)."""
    global _in_use
    _in_use = True


def mark_output(y: Tensor, output_fn) -> None:
    """Attach ``output_fn()`` (a :class:`NormOutput`) to ``y``'s autograd
    node, if it has one and marks are on."""
    if _in_use and y.grad_fn is not None:
        y.grad_fn.metadata[_KEY] = output_fn()


def _affine(layer, channels: int, like: Tensor) -> Tuple[Tensor, Tensor]:
    """A norm layer's current (gamma, beta), detached (1, 0 if none)."""
    if layer.weight is None:
        return like.new_ones(channels), like.new_zeros(channels)
    return (layer.weight.detach().to(like.dtype),
            layer.bias.detach().to(like.dtype))


def feeding_affine(feeding: Feeding, like: Tensor,
                   channels: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """The feeding norms' current (gamma, beta), each (P, C_in): a norm of
    a concatenated branch has zeros outside its channels (``channels``:
    the producer's input channels; default: the norms' own)."""
    pairs = []
    for p in feeding.paths:
        gamma, beta = _affine(p.source.layer, p.channels, like)
        if channels is not None and channels != p.channels:
            pad = (p.start, channels - p.start - p.channels)
            gamma, beta = F.pad(gamma, pad), F.pad(beta, pad)
        pairs.append((gamma, beta))
    return (torch.stack([g for g, _ in pairs]),
            torch.stack([b for _, b in pairs]))


def feeding_state(feeding: Feeding, like: Tensor) -> Tensor:
    """The feeding norms' ``(gamma, beta, m, s, mu, v)`` now, (6, C_f)."""
    rows = []
    for path in feeding.paths:
        src = path.source
        gamma, beta = _affine(src.layer, src.x.shape[1], like)
        raw_mean, raw_var = src.raw_moments
        rows.append(torch.stack([
            gamma, beta, src.mean.to(like.dtype), src.std.to(like.dtype),
            raw_mean.to(like.dtype), raw_var.to(like.dtype)]))
    return torch.cat(rows, 1)


@dataclass
class Upstream:
    """The feeding norms as they are at the current step (no grad).

    ``gamma``/``beta``/``mean``/``std``/``eps`` are (C_f, ) over the
    feeding norms' channels; ``hist_mean``/``hist_var``/``hist_ok`` (L,
    C_f) their compensated entries per lag 1 .. L (``hist_ok``: the entry
    counted).
    """

    gamma: Tensor
    beta: Tensor
    mean: Tensor
    std: Tensor
    eps: Tensor
    hist_mean: Tensor
    hist_var: Tensor
    hist_ok: Tensor
    #: :attr:`Feeding.slices`, and what the fast form applies its terms
    #: with (set by the layer for it, once per call): the producer's
    #: weight now (detached), its ``squared_weight`` and groups.
    slices: tuple = ()
    weight: Optional[Tensor] = None
    weight_sq: Optional[Tensor] = None
    groups: int = 1


def upstream_now(feeding: Feeding, lags: int) -> Upstream:
    """Collect the feeding norms' current state for ``lags`` lags."""
    like = feeding.paths[0].source.mean
    dtype = like.dtype
    gamma, beta, mean_t, std_t = feeding_state(feeding, like)[:4]
    epss, h_mean, h_var, h_ok = [], [], [], []
    for path in feeding.paths:
        src = path.source
        channels = src.x.shape[1]
        epss.append(like.new_full((channels, ), src.layer.eps))
        stats = src.stats
        have = 0 if stats is None else min(lags, stats.mean.shape[0] - 1)
        mean = var = ok = None
        if have > 0:
            rows = slice(1, have + 1)
            mean, var = stats.mean[rows], stats.var[rows]
            ok = stats.keep[rows]
        if have < lags:
            pad = lags - have
            mean = _pad(mean, like.new_zeros((pad, channels)))
            var = _pad(var, like.new_zeros((pad, channels)))
            ok = _pad(ok, like.new_zeros(pad, dtype=torch.bool))
        h_mean.append(mean.to(dtype))
        h_var.append(var.to(dtype))
        h_ok.append(ok.unsqueeze(1).expand(lags, channels))
    return Upstream(gamma, beta, mean_t, std_t, torch.cat(epss),
                    torch.cat(h_mean, 1), torch.cat(h_var, 1),
                    torch.cat(h_ok, 1), slices=feeding.slices)


def _pad(head: Optional[Tensor], tail: Tensor) -> Tensor:
    return tail if head is None else torch.cat([head, tail])


def upstream_params(feeding: Feeding):
    """The feeding norms' live affine parameters that need a gradient, as
    ``(param, part, start, stop)``: part 0 is gamma, 1 beta, over the
    channels ``start:stop`` of the feeding set."""
    start = 0
    for path in feeding.paths:
        layer = path.source.layer
        channels = path.source.x.shape[1]
        for part, param in enumerate((layer.weight, layer.bias)):
            if param is not None and param.requires_grad:
                yield param, part, start, start + channels
        start += channels


def upstream_shift(state: Tensor, match: Tensor, now: Upstream
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """The displacement ``[gamma' - gamma_tau; beta' - beta_tau]`` of
    every slot, and the derivatives of ``gamma'``/``beta'`` in
    ``gamma_t`` (that of ``beta'`` in ``beta_t`` is 1).

    Args:
        state (Tensor): (S, 6, C_f) the slots' recorded ``(gamma, beta, m,
            s, mu, v)``.
        match (Tensor): (L, S) float, 1 where lag ``e`` is held by slot
            ``s`` (:class:`mmcbn.window.Layout`).
        now (Upstream): The feeding norms now.

    Returns:
        tuple[Tensor]: ``shift`` (S, 2, C_f), ``dgamma`` (S, C_f): ``d
        gamma' / d gamma_t`` and ``dbeta`` (S, C_f): ``d beta' / d
        gamma_t``.
    """
    dtype = state.dtype
    gamma_s, beta_s, m_s, s_s, mu_s, v_s = state.unbind(1)
    select = match.t().to(dtype)  # (S, L)
    ok = (select @ now.hist_ok.to(dtype)) > 0
    mu_t = torch.where(ok, select @ now.hist_mean, mu_s)
    v_t = torch.where(ok, select @ now.hist_var, v_s)
    kappa = ((v_t.clamp(min=0) + now.eps) / (v_s + now.eps)).sqrt().clamp(
        *KAPPA_RANGE)
    delta = mu_t - kappa * mu_s
    dgamma = kappa * s_s / now.std
    dbeta = (kappa * m_s + delta - now.mean) / now.std
    gamma_p = now.gamma * dgamma
    beta_p = now.beta + now.gamma * dbeta
    shift = torch.stack([gamma_p - gamma_s, beta_p - beta_s], 1)
    return shift, dgamma, dbeta
