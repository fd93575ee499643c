# Copyright (c) mmcbn contributors. All rights reserved.
"""The compensation of CBN's stored entries, as functions over tensors.

For an entry recorded at iteration ``s`` under producer parameters
``(W_s, b_s)``, the first-order Taylor expansion at the current ``(W, b)``
is (method note)::

    mean_s(W, b) = mean_s + pbar_s . (W - W_s) + (b - b_s)
    nu_s(W, b)   = nu_s   + G_s . (W - W_s)    + 2 mean_s (b - b_s)

(``.`` is the per-output-channel dot product), and the variance is
``nu_s(W, b) - mean_s(W, b)^2``. Written out, the bias terms cancel and the
same value is::

    var_s(W, b) = var_s + Gc_s . (W - W_s) - (mean_s(W, b) - mean_s)^2

with the *centered* moment gradient ``Gc_s = G_s - 2 mean_s pbar_s =
(2/m) sum_i (x_i - mean_s) p_i`` (a conv weight gradient with
``grad_output = 2 (x - mean) / m``). This form never subtracts two large
numbers: ``nu - mean^2`` loses float32 precision when a channel's mean is
large against its spread, ``Gc . W`` is of the size of the variance.
Everything that depends on ``W_s``/``b_s`` is folded into two vectors at
record time::

    a_mean = mean_s - pbar_s . W_s - b_s
    a_var  = var_s  - Gc_s . W_s

so an entry stores ``Gc_s`` (one weight-sized tensor), ``pbar_s`` (one
``C_in * K`` vector shared by all output channels) and C-vectors, never a
copy of the weight, and compensation is a batched row-wise dot product.

The ring that stores the records is :class:`mmcbn.window.WindowState`.
"""
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .binding import Binding
from .upstream import (Upstream, feeding_affine, feeding_state,
                       normalized_inputs, upstream_shift)
from .upstream_fast import fast_grad, fast_record, fast_shift, matrix_grad


@dataclass
class Record:
    """One iteration's statistics with what compensation needs.

    ``raw_mean``/``raw_var`` are the statistics as recorded; ``a_mean``/
    ``a_var`` the folded constants above (the raw mean and variance for an
    uncompensated entry); ``pbar``/``var_grad`` (``Gc``) exist when the
    producer's weight is trainable.
    """

    raw_mean: Tensor
    raw_var: Tensor
    a_mean: Tensor
    a_var: Tensor
    pbar: Optional[Tensor] = None
    var_grad: Optional[Tensor] = None
    #: ``compensate='upstream'``: the derivatives (C_out, 2, C_f) of the
    #: mean and variance in the feeding norms' [gamma; beta], and their
    #: state (6, C_f) (:mod:`mmcbn.upstream`).
    up_hm: Optional[Tensor] = None
    up_hc: Optional[Tensor] = None
    up_state: Optional[Tensor] = None
    #: ``upstream_form='fast'``: the vectors of :mod:`mmcbn.upstream_fast`
    #: in place of ``up_hm``/``up_hc``.
    up_pu: Optional[Tensor] = None
    up_dv: Optional[Tensor] = None
    up_rho: Optional[Tensor] = None


#: Elements per chunk of a row-wise product (the temporary stays in cache;
#: measured best of 2^16..2^22 for ResNet-50's largest layers).
_CHUNK_ELEMENTS = 1 << 20
#: Largest (C_out x L) folded with one batched product (at ResNet-50's
#: sizes the chunked product is faster: benchmarks/train_speed.py).
_SMALL_PRODUCT = 1 << 16


def record_phase(iteration: int, position: int, dim: int,
                 stride: int) -> int:
    """A pseudo-random offset in [0, stride) for one iteration, call
    position and dimension: deterministic (a resumed run draws the same),
    computed on the host."""
    h = (iteration * 0x9E3779B1 + position * 0x85EBCA77 + dim * 0xC2B2AE3D)
    h ^= h >> 15
    h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
    h ^= h >> 12
    return h % stride


def _group_dot(pbar: Tensor, weight: Tensor, add_to: Optional[Tensor] = None,
               alpha: float = 1) -> Tensor:
    """Per-output-channel ``pbar[group(j)] . W_j``; pbar: (..., G, L).

    With ``add_to`` (a tensor of the result's shape, or broadcasting to
    it): ``add_to + alpha * pbar . W``, in one op where ``pbar`` is at most
    2-D.
    """
    groups = pbar.shape[-2]
    if groups == 1:
        w = weight.reshape(weight.shape[0], -1).t()
        p = pbar[..., 0, :]
        if add_to is not None and p.dim() <= 2:
            return torch.addmm(add_to, p.reshape(-1, p.shape[-1]), w,
                               alpha=alpha).reshape(add_to.shape)
        dot = torch.matmul(p, w)
    else:
        w = weight.reshape(groups, weight.shape[0] // groups, -1)
        dot = torch.einsum('...gl,gol->...go', pbar, w).flatten(-2)
    return dot if add_to is None else add_to + alpha * dot


def _row_dot(grad: Tensor, weight: Tensor, add_to: Optional[Tensor] = None,
             alpha: float = 1) -> Tensor:
    """Per-output-channel ``G_j . W_j``; grad: (..., C_out, L).

    Memory-bound (every stored gradient is read once): done in cache-sized
    chunks of output channels, which is several times faster on CPU than a
    batched matmul of (n x L)(L x 1) products or one big temporary. One
    entry's (C_out, L) with ``add_to`` (C_out, ) is one batched product:
    ``add_to + alpha G . W``.
    """
    w = weight.reshape(weight.shape[0], -1)
    if add_to is not None:
        # (small: one op; large: the chunked product below is faster than
        # C_out tiny batched products)
        if grad.dim() == 2 and grad.dtype == w.dtype == add_to.dtype and \
                grad.numel() <= _SMALL_PRODUCT:
            return torch.baddbmm(add_to.view(-1, 1, 1), grad.unsqueeze(1),
                                 w.unsqueeze(2), alpha=alpha).view(-1)
        return add_to + alpha * _row_dot(grad, weight)
    lead = grad.numel() // w.numel()
    rows = max(1, _CHUNK_ELEMENTS // (lead * w.shape[1]))
    if rows >= w.shape[0]:
        return (grad * w).sum(-1)
    out = grad.new_empty(grad.shape[:-1])
    for start in range(0, w.shape[0], rows):
        stop = start + rows
        torch.sum(grad[..., start:stop, :] * w[start:stop], -1,
                  out=out[..., start:stop])
    return out


def _group_dot_t(coef: Tensor, pbar: Tensor) -> Tensor:
    """The transpose of :func:`_group_dot` summed over entries:
    ``sum_s coef[s, j] pbar[s, group(j)]``, shape (C_out, L).

    Args:
        coef (Tensor): (S, C_out).
        pbar (Tensor): (S, G, L).
    """
    slots, groups, length = pbar.shape
    if groups == 1:
        return coef.t() @ pbar[:, 0, :].to(coef.dtype)
    c = coef.reshape(slots, groups, -1)
    return torch.einsum('sgo,sgl->gol', c, pbar.to(coef.dtype)).reshape(
        -1, length)


def _block_dot(deriv: Tensor, shift: Tensor) -> Tensor:
    """Per slot and output channel ``sum deriv[s, j] * shift[s]``:
    deriv (S, C_out, 2, C_f), shift (S, 2, C_f) -> (S, C_out)."""
    slots = deriv.shape[0]
    return torch.bmm(deriv.reshape(slots, deriv.shape[1], -1),
                     shift.reshape(slots, -1, 1).to(deriv.dtype))[..., 0]


def _weighted_rows(grad: Tensor, coef: Tensor) -> Tensor:
    """``sum_s coef[s, j] grad[s, j, :]``: grad (S, C, L), coef (S, C).

    Memory-bound like :func:`_row_dot` (one read of every stored gradient),
    in cache-sized chunks of output channels.
    """
    slots, channels, length = grad.shape
    rows = max(1, _CHUNK_ELEMENTS // max(slots * length, 1))
    if rows >= channels:
        return (grad * coef.unsqueeze(2)).sum(0)
    out = coef.new_empty((channels, length))
    for start in range(0, channels, rows):
        stop = start + rows
        torch.sum(grad[:, start:stop, :] * coef[:, start:stop, None], 0,
                  out=out[start:stop])
    return out


class WindowGradTerms(NamedTuple):
    """The window gradient's closed form, for one layer call (no grad).

    With ``gM = dL/d mean_bar`` and ``gV = dL/d var_bar`` (per channel),
    the gradient that flows through the compensated past entries into the
    producer's current parameters is::

        dL/dW_j = gM_j U[group(j)] + gV_j V_j,   dL/db_j = gM_j bu + gV_j bv_j

    ``U`` (G, L) and ``V`` (C_out, L) are None when the weight needs no
    gradient (frozen, or no entry recorded its derivatives).
    """

    U: Optional[Tensor]
    V: Optional[Tensor]
    #: None where the producer has no trainable bias.
    bu: Optional[Tensor]
    bv: Optional[Tensor]
    #: Upstream compensation: ``dL/d[gamma_t; beta_t]`` of the feeding
    #: norms, (2, C_f), as a function of ``(gM, gV)`` (run in the
    #: backward pass; :mod:`mmcbn.upstream_fast`).
    up_grad: Optional[Callable[[Tensor, Tensor], Tensor]] = None


def window_grad_terms(slots: Dict[str, Tensor], match: Tensor,
                      lag_weight: Tensor, lag_mean: Tensor, lag_pos: Tensor,
                      lag_raw_mean: Tensor, mean_bar: Tensor,
                      need_weight: bool,
                      need_upstream: bool = False,
                      need_bias: bool = True,
                      upstream: Optional[Upstream] = None
                      ) -> WindowGradTerms:
    """Collect the window gradient of one call (method note, "Gradients",
    window rule) over the ring's slots, before the current record is
    written over one of them.

    Entry ``e`` (one lag) enters the window statistics with weight
    ``w_e`` (1/K, times this process's share ``n_e,r / n_e`` of a
    combined entry). Through ``mean_bar = sum_e w_e mu_e`` and ``var_bar =
    sum_e w_e max(nu_e, mu_e^2) - mean_bar^2``::

        dL/dmu_e = w_e (gM + 2 gV (mu_e - mean_bar) - 2 gV mu_e [v_e >= 0])
        dL/dnu_e = w_e gV [v_e >= 0]

    and the entry is first order in the producer's parameters:
    ``d mu_e / dW = pbar_e``, ``d nu_e / dW = G_e = Gc_e + 2 mu_e,raw
    pbar_e``, ``d mu_e / db = 1``, ``d nu_e / db = 2 mu_e,raw``. So with
    ``d_e = mu_e - mean_bar + [v_e >= 0] (mu_e,raw - mu_e)``, which is
    ``mu_e,raw - mean_bar`` or ``mu_e - mean_bar`` (differences of near
    numbers, no cancellation)::

        U = sum_e w_e pbar_e,  V = sum_e w_e (2 d_e pbar_e + [v_e >= 0] Gc_e)
        bu = sum_e w_e,        bv = sum_e 2 w_e d_e

    The per-lag coefficients are formed first (L x C) and moved to the
    ring's slots by ``match`` (each slot holds at most one lag).

    Args:
        slots (dict): The ring's buffers (``pbar`` / ``var_grad`` where
            recorded).
        match (Tensor): (L, S), lag ``e`` is held by slot ``s``.
        lag_weight (Tensor): (L, ) the weights ``w_e`` (0: not counted).
        lag_mean (Tensor): (L, C) the entries' (combined) means (finite).
        lag_pos (Tensor): (L, C) bool, ``v_e >= 0`` (not repaired).
        lag_raw_mean (Tensor): (L, C) their means as recorded (finite).
        mean_bar (Tensor): (C, ) the window mean.
        need_weight (bool): Whether to build ``U`` and ``V``.
        need_upstream (bool): Whether to build the upstream terms (where
            the slots hold them).
        need_bias (bool): Whether to build ``bu`` and ``bv`` (None
            otherwise: the producer has no trainable bias).
        upstream (Upstream, optional): The feeding norms at this call
            (what the fast upstream form's terms are applied with).
    """
    dtype = lag_mean.dtype
    wd = (torch.where(lag_pos, lag_raw_mean, lag_mean) - mean_bar).mul_(
        lag_weight.unsqueeze(1))  # w_e d_e, (L, C)
    bu = bv = None
    if need_bias:
        bv = wd.sum(0).mul_(2)
        bu = lag_weight.sum().expand(bv.shape)
    need_upstream = need_upstream and 'up_dgamma' in slots
    need_weight = need_weight and 'pbar' in slots
    if not (need_weight or need_upstream):
        return WindowGradTerms(None, None, bu, bv)
    # the coefficients of the slots' pbar and Gc (0 for a slot not used),
    # moved from the lags to the slots in one product
    channels = wd.shape[1]
    coef = match.t() @ torch.cat(
        [lag_weight.unsqueeze(1), wd, lag_pos * lag_weight.unsqueeze(1)], 1)
    slot_w, slot_wd = coef[:, 0], coef[:, 1:1 + channels]
    slot_wpos = coef[:, 1 + channels:]
    up_grad = None
    if need_upstream and 'up_pu' in slots:
        up_grad = fast_grad(slots, upstream, slot_w, slot_wd, slot_wpos)
    elif need_upstream:
        up_grad = matrix_grad(
            *_upstream_terms(slots, slot_w, slot_wd, slot_wpos))
    if not need_weight:
        return WindowGradTerms(None, None, bu, bv, up_grad)
    pbar = slots['pbar'].to(dtype)
    groups = pbar.shape[1]
    u = torch.mv(pbar.reshape(pbar.shape[0], -1).t(), slot_w).reshape(
        groups, -1)
    v = _weighted_rows(slots['var_grad'], slot_wpos)
    if groups == 1:
        v = torch.addmm(v, slot_wd.t(), pbar[:, 0, :], alpha=2)
    else:
        v += _group_dot_t(2 * slot_wd, pbar)
    return WindowGradTerms(u, v, bu, bv, up_grad)


def _upstream_terms(slots: Dict[str, Tensor], weight: Tensor, wd: Tensor,
                    coef_v: Tensor) -> Tuple[Tensor, Tensor]:
    """The upstream part of the window gradient (``compensate='upstream'``).

    Entry ``s`` moves by ``Hm_s [gamma'_s - gamma_s; beta'_s - beta_s]``
    (``Hc_s`` for the variance), with ``d gamma' / d gamma_t = a_s``,
    ``d beta' / d gamma_t = b_s`` and ``d beta' / d beta_t = 1``. With
    the slot coefficients of :func:`window_grad_terms` (``w_s`` for the
    mean, ``2 w_s d_s`` and ``w_s [v_s >= 0]`` for the variance)::

        up_p = sum_s w_s J_s Hm_s
        up_q = sum_s 2 w_s d_s J_s Hm_s + w_s [v_s >= 0] J_s Hc_s

    where ``J_s`` maps ``[d gamma'; d beta']`` to ``[d gamma_t; d
    beta_t]``.

    Args:
        slots (dict): The ring's buffers.
        weight (Tensor): (S, ) ``w_s``.
        wd (Tensor): (S, C) ``w_s d_s``.
        coef_v (Tensor): (S, C) ``w_s [v_s >= 0]``.
    """
    dtype = wd.dtype
    a, b = slots['up_dgamma'], slots['up_dbeta']  # (S, C_f)
    rows = (weight != 0).view(-1, 1, 1, 1)

    def chained(deriv):
        deriv = torch.where(rows, deriv.to(dtype), 0.)
        d_gamma = deriv[:, :, 0] * a.unsqueeze(1) + \
            deriv[:, :, 1] * b.unsqueeze(1)
        return torch.stack([d_gamma, deriv[:, :, 1]], 2)  # (S, C, 2, C_f)

    hm, hc = chained(slots['up_hm']), chained(slots['up_hc'])
    up_p = torch.einsum('s,sjkc->jkc', weight, hm)
    up_q = torch.einsum('sj,sjkc->jkc', 2 * wd, hm) + torch.einsum(
        'sj,sjkc->jkc', coef_v, hc)
    return up_p, up_q


def make_record(binding: Binding,
                x: Tensor,
                mean: Tensor,
                var: Tensor,
                compensate: bool,
                moment_stride: int = 1,
                phase: Tuple[int, ...] = (),
                derivatives: bool = False,
                upstream_form: str = 'exact') -> Record:
    """Build the record of the current iteration (no grad).

    Args:
        binding (Binding): The producer found for this call.
        x (Tensor): The CBN input in the stats dtype.
        mean (Tensor): Its per-channel mean.
        var (Tensor): Its per-channel biased variance.
        compensate (bool): False records plain statistics (naive CBN).
        moment_stride (int): Subsampling of ``d nu / d W`` (1: exact).
        phase (tuple[int]): Its first position per spatial dimension.
        derivatives (bool): Record ``pbar`` and ``Gc`` even when not
            compensating (naive values with the window gradient, an
            ablation): the constants stay the raw statistics.
        upstream_form (str): ``'exact'`` records the upstream derivative
            matrices, ``'fast'`` the vectors of :mod:`mmcbn.upstream_fast`
            (``'mean'``: its mean term only, an ablation).
    """
    prod = binding.producer
    if not (compensate or derivatives) or binding.status != 'bound':
        return Record(raw_mean=mean, raw_var=var, a_mean=mean, a_var=var)
    dtype = mean.dtype
    record = Record(raw_mean=mean, raw_var=var, a_mean=mean, a_var=var)
    feeding = binding.feeding
    upstream = compensate and feeding is not None and feeding.paths
    matrices = upstream and upstream_form == 'exact'
    fused = None
    if prod.weight is not None and moment_stride == 1 and not matrices:
        fused = prod.mean_and_moment_grads(x, mean)
    centered = None if fused is not None else \
        x - mean.view((1, -1) + (1, ) * (x.dim() - 2))
    own = None
    if upstream and not matrices:
        fast = fast_record(
            prod, feeding, x, var, with_var=upstream_form != 'mean',
            affine=feeding_affine(feeding, mean, prod.input_shape()[1])
            if feeding.complete else None,
            weight_sq=None if binding.upstream_now is None else
            binding.upstream_now.weight_sq)
        if fast is not None:
            record.up_pu, record.up_dv, record.up_rho = fast
            record.up_state = feeding_state(feeding, mean)
    elif upstream:
        # the upstream derivatives; where the producer's input is made of
        # the feeding norms' outputs alone, they also give its own d nu/dW
        u = normalized_inputs(feeding, dtype, prod.input_shape()[1])
        affine = feeding_affine(feeding, mean) if feeding.complete and \
            prod.weight is not None else None
        hm, hc, own = prod.upstream_grads(u, x, centered, moment_stride,
                                          phase, affine)
        channels = hm.shape[0]
        record.up_hm = hm.reshape(channels, 2, -1)
        record.up_hc = hc.reshape(channels, 2, -1)
        record.up_state = feeding_state(feeding, mean)
    if prod.weight is not None:
        weight = prod.weight.to(dtype)
        if fused is not None:
            record.pbar, record.var_grad = fused
        else:
            record.pbar = prod.patch_mean(x)
            record.var_grad = own if own is not None else \
                prod.moment_weight_grad(centered, moment_stride, phase)
        if compensate:
            record.a_mean = _group_dot(record.pbar, weight, add_to=mean,
                                       alpha=-1)
            record.a_var = _row_dot(record.var_grad, weight, add_to=var,
                                    alpha=-1)
    if prod.bias is not None and compensate:
        record.a_mean = record.a_mean - prod.bias.to(dtype)
    return record


def compensate_slots(buf: Dict[str, Tensor], layout,
                     weight: Optional[Tensor], bias: Optional[Tensor],
                     upstream: Optional[Upstream]
                     ) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """Every slot of a ring compensated to the current parameters (method
    note, "Compensation"; the module docstring): the producer's terms, the
    upstream terms where recorded, the squared mean shift, and the entries
    of the current accumulation cycle as recorded.

    Args:
        buf (dict): The ring's buffers (``a_mean``, ``a_var``,
            ``raw_mean``, ``raw_var``, ``pbar``, ``var_grad``, the
            upstream records), (S, ...) each.
        layout (Layout): The slots' match to the lags
            (:class:`mmcbn.window.Layout`).
        weight (Tensor, optional): The producer's current weight, if
            trainable and compensated.
        bias (Tensor, optional): Its current bias, likewise.
        upstream (Upstream, optional): The feeding norms now.

    Returns:
        tuple: ``mean`` and ``var`` (S, C), and the slots for the window
        gradient (the buffers, plus the upstream terms' derivatives).
    """
    mean, var = buf['a_mean'], buf['a_var']
    raw_mean = buf['raw_mean']
    moved = False
    slots = dict(buf)
    if upstream is not None and 'up_state' in buf:
        shift, dgamma, dbeta = upstream_shift(buf['up_state'],
                                              layout.match, upstream)
        if 'up_pu' in buf:
            d_mean, d_var = fast_shift(buf, shift, upstream)
        else:
            d_mean = _block_dot(buf['up_hm'], shift)
            d_var = _block_dot(buf['up_hc'], shift)
        mean, var = mean + d_mean, var + d_var
        slots.update(up_dgamma=dgamma, up_dbeta=dbeta)
        moved = True
    if 'pbar' in buf and weight is not None:
        w = weight.to(mean.dtype)
        mean = _group_dot(buf['pbar'], w, add_to=mean)
        var = var + _row_dot(buf['var_grad'], w)
        moved = True
    if bias is not None:
        mean = mean + bias.to(mean.dtype)
        moved = True
    if moved:  # the mean's shift, squared (first order in nu)
        shift = mean - raw_mean
        var = torch.addcmul(var, shift, shift, value=-1)
    if layout.exact is not None:
        mean = torch.where(layout.exact, raw_mean, mean)
        var = torch.where(layout.exact, buf['raw_var'], var)
    return mean, var, slots
