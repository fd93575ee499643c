# Copyright (c) mmcbn contributors. All rights reserved.
"""Where the statistics of a CBN layer come from: one seam, two sources.

A window normalization works on *entries* (the current batch and the
compensated earlier iterations), each a sample count ``n_e``, a mean
``mu_e`` and a variance ``v_e = nu_e - mu_e^2``. A statistics source
combines the entries of the processes that share a layer:

- :data:`LOCAL` (CBN): this process's entries as they are.
- :class:`AllReduceStats` (SyncCBN): the entries of every process in a
  process group. Under data parallelism the producer's parameters are the
  same on every process and the compensated statistics are linear in them,
  so per-process entries combine exactly (method note, "Across
  processes")::

      n_e = sum_r n_er,  mu_e = sum_r n_er mu_er / n_e,
      nu_e = sum_r n_er nu_er / n_e

  which is one all-reduce of ``(n, n mu, n nu)`` per entry, O(entries x C)
  numbers per layer and iteration, never a weight-sized tensor. The repair
  ``max(nu_e, mu_e^2)`` and the average run afterwards, on global entries.

In the backward pass a source sums the two per-channel gradient sums over
the processes, exactly as ``SyncBatchNorm`` does.
"""
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


class StatsSource:
    """The statistics of this process alone (CBN)."""

    #: Whether entries are combined over several processes.
    distributed = False

    def combine(self, count: Tensor, mean: Tensor,
                var: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Combine per-process entries into the entries a layer averages.

        Args:
            count (Tensor): Samples per entry, (E, ), 0 for an entry that
                does not count.
            mean (Tensor): Per-channel means, (E, C).
            var (Tensor): Per-channel ``nu - mu^2``, (E, C), not repaired.

        Returns:
            tuple[Tensor]: ``(count, mean, var)`` of the combined entries.
        """
        return count, mean, var

    def sum_grad(self, sums: Tensor) -> Tensor:
        """Sum the per-channel gradient sums over the processes."""
        return sums


#: The local source (a stateless singleton).
LOCAL = StatsSource()


class AllReduceStats(StatsSource):
    """Entries summed over the processes of ``group`` (SyncCBN).

    The sums are taken about a per-channel ``shift`` that every process
    holds identically (SyncCBN's running mean: the running statistics are
    updated from global statistics, so they agree on all processes). The
    result is the same for any shift; a shift near the mean keeps
    ``n nu - n mu^2`` from cancelling in float32.

    Args:
        group (ProcessGroup, optional): The process group; None is the
            default group.
        shift (Tensor, optional): Per-channel shift, (C, ).
    """

    distributed = True

    def __init__(self, group=None, shift: Optional[Tensor] = None) -> None:
        self.group = group
        self.shift = shift

    def combine(self, count: Tensor, mean: Tensor,
                var: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        kept = (count > 0).unsqueeze(1)
        shift = self.shift.to(mean.dtype) if self.shift is not None else \
            mean.new_zeros(mean.shape[1])
        delta = mean - shift
        n = count.unsqueeze(1)
        # (n delta, n (var + delta^2)) per entry; an entry this process does
        # not count adds zeros, whatever it holds
        moments = torch.cat([delta, torch.addcmul(var, delta, delta)], 1)
        moments = torch.where(kept, moments.mul_(n), 0.)
        packed = torch.cat([n, moments], dim=1)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        channels = mean.shape[1]
        total = packed[:, 0]
        # (sample counts are 0 or >= 1: an entry nobody counts divides 0
        # by 1)
        moments = packed[:, 1:] / total.clamp(min=1).unsqueeze(1)
        delta, second = moments[:, :channels], moments[:, channels:]
        return total, delta + shift, torch.addcmul(
            second, delta, delta, value=-1)

    def sum_grad(self, sums: Tensor) -> Tensor:
        sums = sums.contiguous()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group)
        return sums
