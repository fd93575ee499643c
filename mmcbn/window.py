# Copyright (c) mmcbn contributors. All rights reserved.
"""The statistics CBN keeps from earlier iterations, and their compensation.

For an entry recorded at iteration ``s`` under producer parameters
``(W_s, b_s)``, the first-order Taylor expansion at the current ``(W, b)``
is::

    mean_s(W, b) = mean_s + pbar_s . (W - W_s) + (b - b_s)
    nu_s(W, b)   = nu_s   + G_s . (W - W_s)    + 2 mean_s (b - b_s)

(``.`` is the per-output-channel dot product). Everything that depends on
``W_s``/``b_s`` is folded into two vectors at record time::

    a_mean = mean_s - pbar_s . W_s - b_s
    a_nu   = nu_s   - G_s . W_s    - 2 mean_s b_s

so an entry stores ``G_s`` (one weight-sized tensor), ``pbar_s`` (one
``C_in * K`` vector shared by all output channels) and C-vectors, never a
copy of the weight, and compensation is a batched row-wise dot product.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .binding import Binding


@dataclass
class Record:
    """One iteration's statistics with what compensation needs.

    ``a_mean``/``a_nu`` are the folded constants above (plain ``mean`` and
    ``nu`` for an uncompensated entry); ``pbar``/``nu_grad`` exist when the
    producer's weight is trainable, ``mean`` when its bias is.
    """

    a_mean: Tensor
    a_nu: Tensor
    pbar: Optional[Tensor] = None
    nu_grad: Optional[Tensor] = None
    mean: Optional[Tensor] = None


#: Elements per chunk of a row-wise product (the temporary stays in cache;
#: measured best of 2^16..2^22 for ResNet-50's largest layers).
_CHUNK_ELEMENTS = 1 << 20


def _group_dot(pbar: Tensor, weight: Tensor) -> Tensor:
    """Per-output-channel ``pbar[group(j)] . W_j``; pbar: (..., G, L)."""
    groups = pbar.shape[-2]
    if groups == 1:
        return torch.matmul(pbar[..., 0, :], weight.reshape(
            weight.shape[0], -1).t())
    w = weight.reshape(groups, weight.shape[0] // groups, -1)
    return torch.einsum('...gl,gol->...go', pbar, w).flatten(-2)


def _row_dot(grad: Tensor, weight: Tensor) -> Tensor:
    """Per-output-channel ``G_j . W_j``; grad: (..., C_out, L).

    Memory-bound (every stored gradient is read once): done in cache-sized
    chunks of output channels, which is several times faster on CPU than a
    batched matmul of (n x L)(L x 1) products or one big temporary.
    """
    w = weight.reshape(weight.shape[0], -1)
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


def make_record(binding: Binding, x: Tensor, mean: Tensor, var: Tensor,
                compensate: bool) -> Record:
    """Build the record of the current iteration (no grad).

    Args:
        binding (Binding): The producer found for this call.
        x (Tensor): The CBN input in the stats dtype.
        mean (Tensor): Its per-channel mean.
        var (Tensor): Its per-channel biased variance.
        compensate (bool): False records plain statistics (naive CBN).
    """
    nu = var + mean.square()
    prod = binding.producer
    if not compensate or binding.status != 'bound':
        return Record(a_mean=mean, a_nu=nu)
    dtype = mean.dtype
    a_mean, a_nu = mean.clone(), nu.clone()
    record = Record(a_mean=a_mean, a_nu=a_nu)
    if prod.weight is not None:
        weight = prod.weight.to(dtype)
        record.pbar = prod.patch_mean(x)
        record.nu_grad = prod.moment_weight_grad(x)
        a_mean -= _group_dot(record.pbar, weight)
        a_nu -= _row_dot(record.nu_grad, weight)
    if prod.bias is not None:
        bias = prod.bias.to(dtype)
        record.mean = mean
        a_mean -= bias
        a_nu -= 2 * mean * bias
    return record


class WindowState:
    """Ring buffer of the records of the last ``capacity`` iterations.

    Entries are stacked so that compensating all of them is one batched
    product. The order of entries is irrelevant (the window is an average);
    each slot remembers its iteration, so an entry older than the window,
    or from another producer, is never used.

    Args:
        capacity (int): Number of earlier iterations kept (window - 1).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.iterations: List[Optional[int]] = [None] * capacity
        self.key: Optional[tuple] = None
        self._next = 0
        self._buffers: dict = {}

    def reset(self) -> None:
        self.iterations = [None] * self.capacity
        self.key = None
        self._next = 0
        self._buffers = {}

    def __len__(self) -> int:
        return sum(it is not None for it in self.iterations)

    def nbytes(self) -> int:
        """Bytes held by the stored entries."""
        return sum(b.numel() * b.element_size()
                   for b in self._buffers.values())

    def push(self, iteration: int, key: tuple, record: Record) -> None:
        """Store the record of ``iteration`` over the oldest entry."""
        if self.capacity == 0:
            return
        fields = {
            name: value
            for name, value in vars(record).items() if value is not None
        }
        if key != self.key or set(fields) != set(self._buffers) or any(
                self._buffers[n].shape[1:] != v.shape or
                self._buffers[n].device != v.device or
                self._buffers[n].dtype != v.dtype
                for n, v in fields.items()):
            # A new producer or a new layout: the old entries do not apply.
            self.reset()
            self.key = key
            self._buffers = {
                name: value.new_zeros((self.capacity, ) + value.shape)
                for name, value in fields.items()
            }
        slot = self._next
        for name, value in fields.items():
            self._buffers[name][slot].copy_(value)
        self.iterations[slot] = iteration
        self._next = (slot + 1) % self.capacity

    def compensated(
        self, iteration: int, window: int, key: tuple,
        weight: Optional[Tensor], bias: Optional[Tensor]
    ) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
        """Statistics of the stored entries at the current parameters.

        All slots are compensated (no gather copies); ``valid`` tells which
        belong to the window.

        Args:
            iteration (int): The current iteration ``t``.
            window (int): The window ``k``; entries of iterations
                ``t - k + 1 ... t - 1`` are valid.
            key (tuple): The current producer's identity.
            weight (Tensor, optional): The producer's current weight, if
                trainable.
            bias (Tensor, optional): The producer's current bias, if
                trainable.

        Returns:
            tuple[Tensor] | None: ``(mean, nu, valid)`` of shapes (n, C),
            (n, C) and (n, ) for the n slots, or None if no slot is valid.
        """
        if key != self.key:
            return None
        valid = [
            it is not None and 1 <= iteration - it <= window - 1
            for it in self.iterations
        ]
        if not any(valid):
            return None
        buf = self._buffers
        mean, nu = buf['a_mean'], buf['a_nu']
        if 'pbar' in buf:
            w = weight.to(mean.dtype)
            mean = mean + _group_dot(buf['pbar'], w)
            nu = nu + _row_dot(buf['nu_grad'], w)
        if 'mean' in buf:
            b = bias.to(mean.dtype)
            mean = mean + b
            nu = nu + 2 * buf['mean'] * b
        valid = torch.tensor(valid, device=mean.device)
        return mean, nu, valid
