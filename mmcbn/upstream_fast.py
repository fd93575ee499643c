# Copyright (c) mmcbn contributors. All rights reserved.
"""The upstream compensation in vectors (``upstream_form='fast'``).

:mod:`mmcbn.upstream` records, per entry of layer ``l`` and feeding norm
``p``, the derivatives ``Hm`` and ``Hc`` of ``l``'s mean and centered
second moment in ``p``'s ``[gamma; beta]``: two (C_out, 2, C_f) matrices,
contracted with the producer weight ``W_tau`` at record time. In a deep
residual stage those dominate the step and the window state. This form
keeps C_in-sized vectors per feeding block instead.

Notation: the producer ``x = W * z + b`` reads ``z``, which holds ``sum_p
a_p (gamma_p xhat_p + beta_p)`` (``a_p`` the ReLU gates); ``u_r`` (r = 1
.. 2P) are the blocks ``a_p xhat_p`` and ``a_p`` (:func:`mmcbn.upstream.
normalized_inputs`), and a displacement ``d = [gamma' - gamma_tau; beta' -
beta_tau]`` of the feeding norms moves ``z`` by ``dz = sum_r d_r u_r``.

**The mean, exactly.** The mean of ``x`` is bilinear in ``W`` and ``z``:
``mean_j(W, z) = sum_{c,k} W[j, c, k] pbar_z[c, k] + b_j``, with ``pbar``
the mean input patch. So with the recorded patch means of the blocks,
``pu[r, c, k]`` (one weight-gradient call with a single output channel,
a mean over pixels for a 1x1 convolution)::

    mean_j(W_t, z + dz) - mean_j(W_t, z) = sum_{c,k} W_t[j, c, k]
                                           sum_r pu[r, c, k] d_r[c]

holds exactly, for any ``W_t`` (gates and ``xhat`` as recorded). The
matrix form contracts the same derivative with ``W_tau``; the two differ by
``(W_t - W_tau) . pu d``, a second-order term, and this one is the
exact value of the bilinear model. Borders (padding) are in ``pu``.

**The second moment, diagonal and calibrated.** The first-order change of
the variance is ``dvar_j = 2 Cov(x_j, (W * dz)_j)``, which couples every
pair of input channels (a C_out x C_f matrix per entry). Keeping only the
pairs ``c = c'`` at the same pixel::

    dvar_j ~ rho_j sum_c W2[j, c] sum_r dv[r, c] d_r[c]
    W2[j, c] = sum_k W[j, c, k]^2,     dv[r, c] = 2 Cov_pixels(z_c, u_rc)
    rho_j = var_j / sum_c W2[j, c] Var_pixels(z_c)

``rho_j`` (the output variance over what independent inputs would give)
calibrates each output channel, so the direction in which every feeding
norm scales its output (``d = alpha [gamma; beta]``: ``dz = alpha z``,
``dvar = 2 alpha var``) is exact where ``z`` is made of the feeding norms
alone. What it misses is the part of a non-uniform change that
correlations between input channels (or neighbouring pixels) carry.

Per entry this keeps ``pu`` (2P, C_in K), ``dv`` (2P, C_in) and ``rho``
(C_out, ): vectors. Applying it is two products with ``W_t`` and ``W_t^2``
per window; the window gradient is the same products transposed, in the
backward pass. The gradient flows into the feeding norms' ``gamma_t`` and
``beta_t`` (through ``d``), not into ``W_t`` through these terms (second
order).
"""
import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from .upstream_paths import directions, normalized_inputs

#: Names of a fast upstream record's tensors in a window.
FAST_FIELDS = ('up_pu', 'up_dv', 'up_rho')


def squared_weight(weight: Tensor) -> Tensor:
    """``W2[j, c] = sum_k W[j, c, k]^2``, (C_out, C_in / groups)."""
    if weight.dim() <= 2 or weight[0, 0].numel() == 1:  # (no sum over k)
        return weight.reshape(weight.shape[0], -1).square()
    return weight.reshape(weight.shape[0], weight.shape[1], -1).square().sum(
        -1)


def _grouped_product(t: Tensor, w: Tensor, groups: int) -> Tensor:
    """Per output channel ``j`` of group ``g``: ``sum_l t[s, g, l] w[j,
    l]`` over the group's inputs, (S, C_in / groups * L) per group ->
    (S, C_out); ``t`` (S, C_in, ...), ``w`` (C_out, C_in / groups, ...).
    """
    slots_n, c_out = t.shape[0], w.shape[0]
    if groups == 1:
        return t.reshape(slots_n, -1) @ w.reshape(c_out, -1).t()
    return torch.einsum('sgl,gol->sgo', t.reshape(slots_n, groups, -1),
                        w.reshape(groups, c_out // groups, -1)).reshape(
                            slots_n, c_out)


def _grouped_product_t(coef: Tensor, w: Tensor, groups: int) -> Tensor:
    """The transpose of :func:`_grouped_product`: (S, C_out) -> (S, C_in,
    L)."""
    slots_n, c_out = coef.shape
    if groups == 1:
        out = coef @ w.reshape(c_out, -1)
    else:
        out = torch.einsum('sgo,gol->sgl', coef.reshape(slots_n, groups, -1),
                           w.reshape(groups, c_out // groups, -1))
    return out.reshape(slots_n, w.shape[1] * groups, -1)


def _producer_input(prod, feeding, dtype: torch.dtype,
                    affine: Optional[Tuple[Tensor, Tensor]]
                    ) -> Optional[Tensor]:
    """The producer's input: saved by autograd, or (a frozen weight does
    not save it) ``sum_p L_p(gamma_p xhat_p + beta_p)`` where the feeding
    norms make it alone (``affine``); None if neither."""
    saved = prod.saved_input()
    if saved is not None:
        return saved.detach().to(dtype)
    if affine is None:
        return None
    gamma, beta = affine
    u = normalized_inputs(feeding, dtype, gamma.shape[1])
    coef = torch.cat([gamma, beta]).to(dtype)  # (2P, C_in)
    shape = (1, ) + tuple(coef.shape) + (1, ) * (u.dim() - 2)
    blocks = u.reshape((u.shape[0], ) + tuple(coef.shape) + u.shape[2:])
    return (blocks * coef.view(shape)).sum(1)


def _combined_gates(ops, memo: dict, dtype: torch.dtype) -> Optional[Tensor]:
    """The product of a gate-only path's masks (in ``dtype``; None: no
    gate), shared between the paths that end in the same steps (a residual
    chain: one product more per path, each ReLU's mask converted once)."""
    if not ops:
        return None
    key = tuple(id(op) for op in ops)
    if key not in memo:
        rest = _combined_gates(ops[1:], memo, dtype)
        first = memo.get(id(ops[0]))
        if first is None:
            # (float products: several times faster than with bools)
            first = memo[id(ops[0])] = ops[0].value.to(dtype)
        memo[key] = first if rest is None else first * rest
    return memo[key]


def _channel_sums(t: Tensor) -> Tensor:
    """Per channel sum over every other dimension, (C, )."""
    return t.sum((0, ) + tuple(range(2, t.dim())))


def _channel_dots(a: Tensor, b: Tensor) -> Tensor:
    """Per channel ``sum a * b`` over every other dimension, (C, )."""
    n, c = a.shape[:2]
    return torch.linalg.vecdot(a.reshape(n, c, -1), b.reshape(n, c, -1)).sum(
        0)


def fast_record(prod, feeding, x: Tensor, var: Tensor,
                with_var: bool = True,
                affine: Optional[Tuple[Tensor, Tensor]] = None,
                weight_sq: Optional[Tensor] = None
                ) -> Optional[Tuple[Tensor, Optional[Tensor],
                                    Optional[Tensor]]]:
    """The fast form's record of one entry (no grad).

    Where the producer reads single pixels (1x1, linear) and a path's steps
    are ReLU gates, every term is a per-channel sum over the source's own
    input ``x_p``: with the combined gate ``a`` and ``xhat = (x_p - m) /
    s``, ``E[a xhat] = (E[a x_p] - m E[a]) / s`` and ``Cov(z, a xhat) =
    (E[zc a x_p] - m E[zc a]) / s`` (``zc``: the centered producer input),
    so no direction is built. Other paths build ``L(xhat)`` and ``L(1)``.

    Args:
        prod (Producer): The producer.
        feeding (Feeding): Its feeding norms.
        x (Tensor): The producer's output (the CBN input), stats dtype.
        var (Tensor): Its per-channel variance, (C_out, ).
        with_var (bool): False: the mean term only (``dv``/``rho`` None;
            ``upstream_form='mean'``, an ablation).
        affine (tuple[Tensor], optional): The feeding norms' ``(gamma,
            beta)``, (P, C_in) each, where they alone make the producer's
            input.
        weight_sq (Tensor, optional): :func:`squared_weight` of the weight
            the producer used, where already computed this step.

    Returns:
        tuple[Tensor] | None: ``pu`` (2, C_f K) (the gamma and beta
        directions' patch means, per feeding channel), ``dv`` (2, C_f) and
        ``rho`` (C_out, ); None where the producer's input is unknown (a
        frozen weight, and other paths into it).
    """
    dtype = x.dtype
    z = _producer_input(prod, feeding, dtype, affine)
    if z is None:
        return None
    pixel = prod.pixel_patch
    zc = count = None
    if with_var:
        zp = prod.read_pixels(z)
        count = max(zp.numel() // max(zp.shape[1], 1), 1)
        zc = zp - (_channel_sums(zp) / count).view(
            (1, -1) + (1, ) * (zp.dim() - 2))
    # (the patch mean is per input channel, whatever the groups: a
    # branch's own channels)
    per_channel = dataclasses.replace(prod, groups=1)
    memo: dict = {}
    pus, dvs = [], []
    for path in feeding.paths:
        src = path.source
        zs = None if zc is None else \
            zc[:, path.start:path.start + path.channels]
        if pixel and all(op.kind == 'gate' for op in path.ops):
            m = src.mean.to(dtype)
            s = src.std.to(dtype)
            xs = prod.read_pixels(src.x.detach().to(dtype))
            gate = _combined_gates(path.ops, memo, dtype)
            n = max(xs.numel() // max(xs.shape[1], 1), 1)
            if gate is None:
                s_a = xs.new_full((xs.shape[1], ), float(n))
                gx = xs
            else:
                gate = prod.read_pixels(gate)
                s_a = _channel_sums(gate)
                gx = gate * xs
            s_ax = _channel_sums(gx)
            pus.append(torch.stack([(s_ax - m * s_a) / s, s_a]).div_(n))
            if zs is not None:
                s_za = _channel_sums(zs) if gate is None else \
                    _channel_dots(zs, gate)
                s_zax = _channel_dots(zs, gx)
                dvs.append(torch.stack([(s_zax - m * s_za) / s,
                                        s_za]).mul_(2.0 / count))
            continue
        xhat, one = directions(path, dtype)
        pu = per_channel.patch_mean(x, torch.cat([xhat, one], 1))
        pus.append(pu.reshape(2, -1))
        if zs is not None:
            xhat, one = prod.read_pixels(xhat), prod.read_pixels(one)
            dvs.append(torch.stack([_channel_dots(zs, xhat),
                                    _channel_dots(zs, one)]).mul_(
                                        2.0 / count))
    pu = torch.cat(pus, 1)
    if not with_var:
        return pu, None, None
    dv = torch.cat(dvs, 1)
    var_z = _channel_dots(zc, zc).div_(count)
    if weight_sq is None:
        weight_sq = squared_weight(prod.weight_value(dtype))
    denom = _grouped_product(var_z.unsqueeze(0), weight_sq.to(dtype),
                             prod.groups)[0]
    rho = torch.where(denom > 0, var / denom.clamp(min=1e-30), 0.)
    return pu, dv, rho


def _to_inputs(t: Tensor, slices, c_in: int) -> Tensor:
    """(S, C_f, ...) per feeding channel -> (S, C_in, ...) per producer
    input channel (summed where norms share a channel)."""
    out = t.new_zeros((t.shape[0], c_in) + t.shape[2:])
    for first, start, count in slices:
        out[:, start:start + count] += t[:, first:first + count]
    return out


def _to_feeding(t: Tensor, slices) -> Tensor:
    """The transpose of :func:`_to_inputs`."""
    return torch.cat([t[:, start:start + count]
                      for _, start, count in slices], 1)


def fast_shift(slots: Dict[str, Tensor], shift: Tensor,
               now) -> Tuple[Tensor, Tensor]:
    """The change of every slot's mean and variance, (S, C_out) each, for
    the displacements ``shift`` (S, 2, C_f) of the feeding norms.

    Args:
        slots (dict): The ring's buffers (``up_pu``, ``up_dv``,
            ``up_rho``).
        shift (Tensor): (S, 2, C_f) ``[gamma' - gamma_tau; beta' -
            beta_tau]`` per slot.
        now (Upstream): The feeding norms and the producer now
            (:class:`mmcbn.upstream.Upstream`: ``weight``, ``weight_sq``,
            ``slices``, ``groups``).
    """
    dtype = shift.dtype
    slices, groups = now.slices, now.groups
    w = now.weight.to(dtype)
    c_in = w.shape[1] * groups
    pu = slots['up_pu'].to(dtype)
    slots_n, c_f = shift.shape[0], shift.shape[2]
    q = (pu.view(slots_n, 2, c_f, -1) * shift.unsqueeze(-1)).sum(1)
    q = _to_inputs(q, slices, c_in)  # (S, C_in, K)
    d_mean = _grouped_product(q, w, groups)
    if 'up_dv' not in slots:  # the mean term only
        return d_mean, torch.zeros_like(d_mean)
    qv = _to_inputs((slots['up_dv'].to(dtype) * shift).sum(1), slices, c_in)
    d_var = _grouped_product(qv, now.weight_sq.to(dtype), groups).mul_(
        slots['up_rho'].to(dtype))
    return d_mean, d_var


def fast_grad(slots: Dict[str, Tensor], now, slot_w: Tensor,
              slot_wd: Tensor, slot_wpos: Tensor
              ) -> Callable[[Tensor, Tensor], Tensor]:
    """The window gradient into the feeding norms' ``[gamma_t; beta_t]``,
    as a function of ``gM = dL/dmean_bar`` and ``gV = dL/dvar_bar``
    (evaluated in the backward pass: nothing weight-sized is built).

    Slot ``s``'s mean moves with coefficient ``A[s, j] = w_s gM_j + 2 w_s
    d_s,j gV_j`` (the window mean and the squared mean shift in the
    variance) and its variance with ``B[s, j] = w_s [v_s >= 0] gV_j``
    (:func:`mmcbn.compensation.window_grad_terms`). Through :func:`fast_shift`,
    with ``c(f)`` the producer channel of feeding channel ``f``::

        dL/d d[s, part, f] = sum_k (A W)[s, c(f), k] pu[s, part, f, k]
                             + (rho B W2)[s, c(f)] dv[s, part, f]

    and ``d gamma' / d gamma_t = a_s``, ``d beta' / d gamma_t = b_s``,
    ``d beta' / d beta_t = 1`` (:func:`mmcbn.upstream.upstream_shift`).

    Args:
        slots (dict): The ring's buffers and the slots' ``up_dgamma`` /
            ``up_dbeta``.
        now (Upstream): As :func:`fast_shift` (the weight at the forward).
        slot_w (Tensor): (S, ) ``w_s``.
        slot_wd (Tensor): (S, C_out) ``w_s d_s``.
        slot_wpos (Tensor): (S, C_out) ``w_s [v_s >= 0]``.

    Returns:
        callable: ``(gM, gV) -> (2, C_f)``.
    """
    # (copies: the current record is written over a slot before the
    # backward pass; these are vectors)
    pu = slots['up_pu'].clone()
    dv, rho = (None, None) if 'up_dv' not in slots else (
        slots['up_dv'].clone(), slots['up_rho'].clone())
    a, b = slots['up_dgamma'], slots['up_dbeta']
    used = (slot_w != 0).view(-1, 1, 1)
    weight, weight_sq = now.weight, now.weight_sq
    slices, groups = now.slices, now.groups

    def grad(g_mean: Tensor, g_var: Tensor) -> Tensor:
        dtype = g_mean.dtype
        with torch.autocast(g_mean.device.type, enabled=False):
            w = weight.to(dtype)
            slots_n, c_f = a.shape
            coef_m = torch.addcmul(slot_w.to(dtype).unsqueeze(1) * g_mean,
                                   slot_wd.to(dtype), g_var, value=2)
            gm = _grouped_product_t(coef_m, w, groups)  # (S, C_in, K)
            gm = _to_feeding(gm, slices).unsqueeze(1)  # (S, 1, C_f, K)
            g = (gm * pu.to(dtype).view(slots_n, 2, c_f, -1)).sum(-1)
            if dv is not None:
                coef_v = slot_wpos.to(dtype) * g_var * rho.to(dtype)
                gv = _grouped_product_t(coef_v, weight_sq.to(dtype), groups)
                gv = _to_feeding(gv[..., 0], slices)
                g = g + gv.unsqueeze(1) * dv.to(dtype)
            g = torch.where(used, g, 0.)  # (S, 2, C_f)
            d_gamma = g[:, 0] * a.to(dtype) + g[:, 1] * b.to(dtype)
            return torch.stack([d_gamma.sum(0), g[:, 1].sum(0)])

    return grad


def matrix_grad(up_p: Optional[Tensor], up_q: Optional[Tensor]
                ) -> Optional[Callable[[Tensor, Tensor], Tensor]]:
    """The exact form's precomputed terms as the same function."""
    if up_p is None:
        return None

    def grad(g_mean: Tensor, g_var: Tensor) -> Tensor:
        # (element-wise products and a sum: no matmul that an autocast
        # region around the backward would run in half precision)
        return (g_mean.view(-1, 1, 1) * up_p +
                g_var.view(-1, 1, 1) * up_q).sum(0)

    return grad
