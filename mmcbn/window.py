# Copyright (c) mmcbn contributors. All rights reserved.
"""The statistics CBN keeps from earlier iterations, and their compensation.

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

Nothing in the training step reads a tensor on the host. Which slot holds
which lag depends only on the iteration numbers the host assigned, so the
host builds that matching (a :class:`Layout` of device constants) once per
distinct layout and reuses it; each slot's sample count and whether its
record was finite stay on the device, so dropping an entry that is not
finite is tensor arithmetic too.
"""
from dataclasses import dataclass
from typing import (Any, Callable, Dict, List, NamedTuple, Optional,
                    Tuple)

import torch
from torch import Tensor

from .binding import Binding
from .upstream import (Upstream, feeding_affine, feeding_state,
                       normalized_inputs, upstream_shift)
from .upstream_fast import fast_grad, fast_record, fast_shift, matrix_grad

#: Per-slot bookkeeping tensors (not records): the samples of the entry,
#: 0 for a record that was not finite (stored as zeros, unusable).
_META = ('count', )
#: The per-channel statistics of a record, stored as one (4, C) block.
_SMALL = ('raw_mean', 'raw_var', 'a_mean', 'a_var')
#: Window layouts (device constants) kept per window: a ring of ``S`` slots
#: in steady state cycles through ``S`` of them.
_MAX_LAYOUTS = 64
#: Positions of the parameter ids (weight, bias) in a producer key.
_PARAM_ID_FIELDS = (1, 3)


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


def finite_rows(t: Tensor) -> Tensor:
    """Per row of a 2-D tensor: whether every value is finite (bool, (R, )).

    Three ops where ``torch.isfinite(t).all(1)`` takes six (``isfinite``
    is a composite of five): the row sum is finite exactly when its values
    are, unless they are so large that the sum overflows float32 (1e38:
    a diverged entry either way).
    """
    return t.sum(1).mul_(0) == 0


def all_finite(*tensors: Tensor) -> Tensor:
    """Whether every value of ``tensors`` is finite (0-dim bool), as
    :func:`finite_rows` (a sum that overflows counts as not finite)."""
    if all(t.shape == tensors[0].shape for t in tensors):
        total = tensors[0]
        for t in tensors[1:]:
            total = total + t
        total = total.sum()
    else:
        total = sum(t.sum() for t in tensors)
    return total.mul_(0) == 0


class Layout(NamedTuple):
    """Which slot holds which lag now, as device constants (no grad).

    It depends only on iteration numbers the host assigned, so it is built
    on the host's knowledge, once per distinct layout (a ring in steady
    state cycles through ``capacity`` of them) and reused: a training step
    spends no op on lag matching.
    """

    #: (L, S) float, 1 where lag ``e`` is held by slot ``s``.
    match: Tensor
    #: (S, ) bool, the slot holds a lag inside the window.
    in_window: Tensor
    #: (S, 1) bool, the slot is of the current accumulation cycle (used as
    #: recorded); None if none is.
    exact: Optional[Tensor]


def _without_ids(feed: Optional[tuple]) -> Optional[tuple]:
    """A feeding-norm identity without the layers' ``id``."""
    return None if feed is None else tuple(
        (f[0], ) + tuple(f[2:]) for f in feed)


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
                      up_layout: tuple = ((), 1)) -> WindowGradTerms:
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
        up_layout (tuple): The fast upstream form's ``(slices, groups)``
            (:attr:`mmcbn.upstream.Feeding.slices`, the producer's groups).
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
        slices, groups = up_layout
        up_grad = fast_grad(slots, slots['up_weight'], slices, slot_w,
                            slot_wd, slot_wpos, groups,
                            slots.get('up_weight_sq'))
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
            weight_sq=binding.scratch.get('weight_sq'))
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


class History(NamedTuple):
    """The earlier entries of a window, one row per lag ``1 .. L`` (no grad).

    ``count`` (L, ) holds the samples (0 where no usable entry), ``mean``
    and ``var`` (L, C) the compensated mean and variance (``nu - mu^2``,
    before the repair), ``raw_mean`` and ``raw_var`` (L, C) the statistics
    as recorded, and ``dropped`` (0-dim) the entries inside the window
    dropped because a compensated value was not finite. ``match`` (L, S)
    maps the lags to the ring's slots and ``slots`` holds the ring's
    buffers as they were (for the window gradient, which reads them before
    the current record is pushed); both are None for an empty history.
    """

    count: Tensor
    mean: Tensor
    var: Tensor
    raw_mean: Tensor
    raw_var: Tensor
    dropped: Tensor
    match: Optional[Tensor] = None
    slots: Optional[Dict[str, Tensor]] = None


def empty_history(lags: int, like: Tensor) -> History:
    """A history of ``lags`` rows that all do not count."""
    zeros = like.new_zeros((lags, like.shape[0]))
    return History(like.new_zeros(lags), zeros, zeros, zeros, zeros,
                   like.new_zeros((), dtype=torch.int64))


class WindowState:
    """Ring buffer of the records of the last ``capacity`` iterations.

    Entries are stacked so that compensating all of them is one batched
    product. Each slot holds its iteration and accumulation cycle (host),
    its sample count and whether its record was finite (device), so an
    entry older than the window, from another producer, or not finite is
    never used.

    Args:
        capacity (int): Number of earlier iterations kept (window - 1).
        store_dtype (torch.dtype, optional): dtype of the stored
            weight-sized ``d nu / d W`` entries; None keeps theirs.
    """

    #: Records stored in ``store_dtype`` (the weight-sized ones).
    _COMPRESSIBLE = ('var_grad', 'up_hm', 'up_hc')

    def __init__(self, capacity: int,
                 store_dtype: Optional[torch.dtype] = None) -> None:
        self.capacity = capacity
        self.store_dtype = store_dtype
        self.reset()

    def reset(self) -> None:
        """Forget every entry."""
        self.iterations: List[Optional[int]] = [None] * self.capacity
        #: The accumulation cycle of each slot's iteration.
        self.cycles: List[Optional[int]] = [None] * self.capacity
        self.key: Optional[tuple] = None
        #: The feeding norms the entries were recorded under (upstream
        #: compensation; None: none).
        self.feed: Optional[tuple] = None
        self._next = 0
        self._buffers: Dict[str, Tensor] = {}
        self._layouts: Dict[tuple, Layout] = {}
        #: A 0-dim zero of the statistics (a ``where`` operand).
        self._zero: Optional[Tensor] = None
        #: (S, 4, C): the buffers named in ``_SMALL`` are its views.
        self._small: Optional[Tensor] = None

    def __len__(self) -> int:
        """Slots holding an entry (finite or not)."""
        return sum(it is not None for it in self.iterations)

    def nbytes(self) -> int:
        """Bytes held by the stored entries."""
        return sum(b.numel() * b.element_size()
                   for b in self._buffers.values())

    def push(self, iteration: int, key: tuple, record: Record, count: int,
             cycle: Optional[int] = None,
             feed: Optional[tuple] = None) -> Tensor:
        """Store the record of ``iteration`` over the oldest entry.

        ``cycle`` is the accumulation cycle of ``iteration`` (default: the
        iteration itself): entries of the current cycle are exact.
        ``feed`` names the feeding norms of an upstream-compensated record.

        A record with a non-finite statistic is stored as zeros and marked
        unusable, decided on the device.

        Returns:
            Tensor: 0-dim bool, whether the record was finite (stored).
        """
        fields = {
            name: value
            for name, value in vars(record).items()
            if value is not None and name not in _SMALL
        }
        # the four C-vectors in one (4, C) block: checked and stored at once
        small = torch.stack([getattr(record, name) for name in _SMALL])
        ok = all_finite(small)
        if self.capacity == 0:
            return ok
        buffers = self._buffers
        dtypes = {
            name: self.store_dtype if self.store_dtype is not None and
            name in self._COMPRESSIBLE else value.dtype
            for name, value in fields.items()
        }
        if key != self.key or feed != self.feed or \
                set(fields) | set(_META) | set(_SMALL) != set(buffers) or \
                self._small is None or \
                self._small.shape[1:] != small.shape or \
                self._small.device != small.device or \
                self._small.dtype != small.dtype or \
                any(buffers[n].shape[1:] != v.shape or
                    buffers[n].device != v.device or
                    buffers[n].dtype != dtypes[n]
                    for n, v in fields.items()):
            # A new producer or a new layout: the old entries do not apply.
            self.reset()
            self.key = key
            self.feed = feed
            buffers = self._buffers = {
                name: value.new_zeros((self.capacity, ) + value.shape,
                                      dtype=dtypes[name])
                for name, value in fields.items()
            }
            self._small = small.new_zeros((self.capacity, ) + small.shape)
            for index, name in enumerate(_SMALL):
                buffers[name] = self._small[:, index]
            buffers['count'] = small.new_zeros(self.capacity)
            self._zero = small.new_zeros(())
        if iteration in self.iterations:  # the same iteration again
            slot = self.iterations.index(iteration)
        else:
            slot = self._next
            self._next = (slot + 1) % self.capacity
        zero = self._zero
        torch.where(ok, small, zero, out=self._small[slot])
        for name, value in fields.items():
            target = buffers[name][slot]
            if target.dtype == value.dtype:
                torch.where(ok, value, zero, out=target)
            else:  # converted while copied; zeroed if not finite
                target.copy_(value).masked_fill_(~ok, 0)
        # the entry's samples; 0 for a record that was not finite: unusable,
        # every window leaves it out
        torch.mul(ok, count, out=buffers['count'][slot])
        self.iterations[slot] = iteration
        self.cycles[slot] = iteration if cycle is None else cycle
        return ok

    def adopt_key(self, key: tuple, feed: Optional[tuple] = None) -> bool:
        """Take the entries over for ``key`` if it differs from theirs in
        the parameter ids only (the same producer kind, shapes, arguments
        and trainability): the producer of a copied model.

        Returns:
            bool: Whether the key was taken over.
        """
        old = self.key
        if old is None or old == key or old[0] not in ('conv', 'linear') \
                or old[0] != key[0] or len(old) != len(key):
            return False
        for index, (a, b) in enumerate(zip(old, key)):
            same = (a is None) == (b is None) if index in _PARAM_ID_FIELDS \
                else a == b
            if not same:
                return False
        if _without_ids(self.feed) != _without_ids(feed):
            return False
        self.key = key
        self.feed = feed
        return True

    def has_entries(self, iteration: int, lags: int, key: tuple,
                    feed=...) -> bool:
        """Whether some slot holds an iteration ``t - lags .. t - 1`` of
        this producer (and these feeding norms, unless ``feed`` is left
        out; host bookkeeping only)."""
        if feed is not ... and feed != self.feed:
            return False
        return key == self.key and any(self._lags_of(iteration, lags))

    def _lags_of(self, iteration: int, lags: int) -> Tuple[int, ...]:
        """Each slot's lag ``1 .. lags`` at ``iteration``, 0 where it holds
        none of the window."""
        return tuple(
            iteration - it if it is not None and 0 < iteration - it <= lags
            else 0 for it in self.iterations)

    def compensated(self,
                    iteration: int,
                    lags: int,
                    key: tuple,
                    weight: Optional[Tensor],
                    bias: Optional[Tensor],
                    cycle: Optional[int] = None,
                    upstream: Optional[Upstream] = None,
                    feed=...) -> Optional[History]:
        """The entries of lags ``1 .. lags`` at the current parameters.

        All slots are compensated at once (no gather copies), then checked,
        masked and matched to their lags as one block, by the
        :meth:`layout` the host's iteration numbers give.

        Args:
            iteration (int): The current iteration ``t``.
            lags (int): ``window - 1``: entries of iterations
                ``t - lags ... t - 1`` are used.
            key (tuple): The current producer's identity.
            weight (Tensor, optional): The producer's current weight, if
                trainable and compensated.
            bias (Tensor, optional): The producer's current bias, likewise.
            cycle (int, optional): The current accumulation cycle: entries
                of this cycle were recorded under the current weights and
                are used exactly as recorded.
            upstream (Upstream, optional): The feeding norms now: also
                compensate the entries for their change (where recorded).
            feed (tuple, optional): The feeding norms' identity, which the
                entries must have been recorded under (left out: any).

        Returns:
            History | None: One row per lag, or None if no slot belongs to
            the window (known on the host).
        """
        if (feed is not ... and feed != self.feed) or key != self.key:
            return None
        layout = self.layout(iteration, lags, cycle)
        if layout is None:  # no slot of the window holds an entry
            return None
        buf = self._buffers
        mean, var = buf['a_mean'], buf['a_var']
        raw_mean = buf['raw_mean']
        moved = False
        slots = dict(buf)
        if upstream is not None and 'up_state' in buf:
            shift, dgamma, dbeta = upstream_shift(buf['up_state'],
                                                  layout.match, upstream)
            if 'up_pu' in buf:
                d_mean, d_var = fast_shift(buf, shift, upstream.weight,
                                           upstream.slices, upstream.groups,
                                           upstream.weight_sq)
                slots['up_weight'] = upstream.weight
                if upstream.weight_sq is not None:
                    slots['up_weight_sq'] = upstream.weight_sq
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
        # one (S, 1 + 4C) block: checked, masked and matched to the lags
        # at once
        packed = torch.cat([buf['count'].unsqueeze(1).to(mean.dtype), mean,
                            var, raw_mean, buf['raw_var']], 1)
        # (an unusable record is zeros and a count of 0: dropped here are
        # the entries that compensation made non-finite)
        finite = finite_rows(packed)
        dropped = (layout.in_window > finite).sum()
        packed = torch.where(finite.unsqueeze(1), packed, self._zero)
        rows = layout.match @ packed
        c = mean.shape[1]
        return History(rows[:, 0], rows[:, 1:1 + c], rows[:, 1 + c:1 + 2 * c],
                       rows[:, 1 + 2 * c:1 + 3 * c], rows[:, 1 + 3 * c:],
                       dropped, layout.match, slots)

    def layout(self, iteration: int, lags: int,
               cycle: Optional[int] = None) -> Optional[Layout]:
        """The device constants that match the slots to lags ``1 ..
        lags`` at ``iteration`` (and mark those of accumulation cycle
        ``cycle``): built from the host's iteration numbers once per
        distinct layout, then reused (until the buffers are reallocated).
        None if no slot holds a lag of the window."""
        lag_of = self._lags_of(iteration, lags)
        if not any(lag_of):
            return None
        exact = None
        if cycle is not None and cycle in self.cycles:
            exact = tuple(
                bool(lag) and cy == cycle
                for lag, cy in zip(lag_of, self.cycles))
        key = (lags, lag_of, exact)
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) >= _MAX_LAYOUTS:
                self._layouts.clear()
            layout = self._layouts[key] = self._build_layout(
                lags, lag_of, exact)
        return layout

    def _build_layout(self, lags: int, lag_of: Tuple[int, ...],
                      exact: Optional[Tuple[bool, ...]]) -> Layout:
        # filled element by element from host ints: no copy from the host
        count = self._buffers['count']
        match = count.new_zeros((lags, self.capacity))
        in_window = torch.zeros(
            self.capacity, dtype=torch.bool, device=count.device)
        mark = None
        if exact is not None and any(exact):
            mark = torch.zeros((self.capacity, 1), dtype=torch.bool,
                               device=count.device)
        for slot, lag in enumerate(lag_of):
            if lag:
                match[lag - 1, slot].fill_(1)
                in_window[slot].fill_(True)
            if mark is not None and exact[slot]:
                mark[slot].fill_(True)
        return Layout(match, in_window, mark)

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """The entries, on the CPU, for a checkpoint."""
        return dict(
            capacity=self.capacity,
            iterations=list(self.iterations),
            cycles=list(self.cycles),
            next=self._next,
            key=self.key,
            feed=self.feed,
            buffers={k: v.detach().cpu()
                     for k, v in self._buffers.items()})

    def load_state_dict(self, state: Dict[str, Any],
                        device: torch.device) -> None:
        """Restore what :meth:`state_dict` returned (key already mapped)."""
        if state['capacity'] != self.capacity:
            raise ValueError(f'a window of {state["capacity"]} earlier '
                             f'entries cannot fill one of {self.capacity}')
        buffers = dict(state['buffers'])
        self.iterations = list(state['iterations'])
        # (windows saved before 2026-12-06 kept the slots' iterations and
        # cycles on the device too; the host's lists are all that is used)
        saved_cycles = buffers.pop('cycle', None)
        buffers.pop('iteration', None)
        # (and a usable flag per slot, now a count of 0)
        saved_ok = buffers.pop('ok', None)
        if saved_ok is not None:
            buffers['count'] = buffers['count'] * saved_ok
        if 'cycles' in state:
            self.cycles = list(state['cycles'])
        elif saved_cycles is not None:
            self.cycles = [
                None if it is None else int(cy)
                for it, cy in zip(self.iterations, saved_cycles.tolist())
            ]
        else:
            self.cycles = list(self.iterations)
        self._next = int(state['next'])
        self.key = state['key']
        self.feed = state.get('feed')
        self._buffers = {k: v.to(device) for k, v in buffers.items()}
        self._layouts = {}
        self._link_small()

    def _link_small(self) -> None:
        """Make the per-channel statistics views of one block again (after
        loading or copying, which store them apart)."""
        self._small = None
        self._zero = None if 'a_mean' not in self._buffers else \
            self._buffers['a_mean'].new_zeros(())
        if all(name in self._buffers for name in _SMALL):
            self._small = torch.stack(
                [self._buffers[name] for name in _SMALL], 1)
            for index, name in enumerate(_SMALL):
                self._buffers[name] = self._small[:, index]

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # (a pickled copy holds the views as separate tensors)
        self.__dict__.update(state)
        self._buffers = dict(self._buffers)
        self._link_small()


def entry_shapes(state: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Shapes of the per-entry tensors of a saved window (for checks)."""
    return {k: tuple(v.shape[1:]) for k, v in state['buffers'].items()}
