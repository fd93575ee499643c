# Copyright (c) mmcbn contributors. All rights reserved.
"""Running statistics of a CBN layer, updated as ``nn.BatchNorm2d`` does,
NaN-safely and without a host synchronization (a mixin of
:class:`mmcbn.cbn._CrossIterationBatchNorm`)."""
from typing import Tuple, Union

import torch
from torch import Tensor

from .functional import batch_norm_with_stats
from .health import SKIPPED
from .window import all_finite


class RunningStatistics:
    """BatchNorm's training step and running-statistics update.

    Uses the layer's BatchNorm state (``running_mean``, ``running_var``,
    ``num_batches_tracked``, ``momentum``, ``eps``, ``weight``, ``bias``)
    and its event counter ``_flag``.
    """

    def _batch_norm(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Plain training-mode BN; running stats updated NaN-safely.

        Returns:
            tuple[Tensor]: The output and the batch mean and variance.
        """
        y, mean_t, var_t = batch_norm_with_stats(x, self.weight, self.bias,
                                                 self.eps)
        self._update_running_stats(mean_t, var_t, x.numel() // x.shape[1])
        return y, mean_t, var_t

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor,
                              count: Union[int, Tensor]) -> None:
        """Momentum update, as nn.BatchNorm does, from statistics of
        ``count`` values per channel (the variance is made unbiased).

        A non-finite statistic leaves the running statistics and
        ``num_batches_tracked`` as they are (counted for a warning); an
        empty batch leaves the statistics as they are and counts, as in
        BatchNorm. Decided on the device: no synchronization.
        """
        if not self.track_running_stats or self.running_mean is None:
            return
        # (a finite variance implies a finite mean: a mean that is not
        # makes every deviation from it, and so the variance, not finite)
        finite = all_finite(var)
        if isinstance(count, Tensor):
            nonempty = count > 0
            # (1 for a count of 1; 0 for an empty batch, which updates
            # nothing)
            bessel = count / (count - 1).clamp(min=1)
            skipped = nonempty > finite  # nonempty and not finite
            update = nonempty & finite
            tracked = ~skipped
            self._flag(SKIPPED, skipped)
        else:  # a count the host knows: fewer ops
            bessel = count / (count - 1) if count > 1 else 1.0
            update = finite if count > 0 else None
            tracked = finite if count > 0 else 1
            if count > 0:
                self._flag(SKIPPED, finite, complement=True)
        self.num_batches_tracked.add_(tracked)
        if update is None:  # an empty batch: nothing to average
            return
        if self.momentum is None:
            factor = 1.0 / self.num_batches_tracked.clamp(min=1).to(
                self.running_mean.dtype)
        else:
            factor = self.momentum
        running_mean, running_var = self.running_mean, self.running_var
        var = var * bessel if isinstance(bessel, Tensor) or bessel != 1 \
            else var
        new_mean = torch.where(update, mean.to(running_mean.dtype),
                               running_mean)
        new_var = torch.where(update, var.to(running_var.dtype), running_var)
        if isinstance(factor, Tensor):
            running_mean.lerp_(new_mean, factor)
            running_var.lerp_(new_var, factor)
        else:  # both in one op
            torch._foreach_lerp_([running_mean, running_var],
                                 [new_mean, new_var], factor)
