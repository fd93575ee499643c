# Copyright (c) mmcbn contributors. All rights reserved.
"""SyncCBN: statistics across processes and across iterations in one layer.

In a distributed run a SyncCBN layer normalizes with the window statistics
of the *global* batch: the current batch of every process plus the
compensated statistics of the last ``window - 1`` iterations of every
process, so the effective batch is window x processes x per-process batch.
Each process compensates its own entries (the producer's parameters are the
same everywhere under DDP, and the compensation is linear in them); one
all-reduce of ``(n, n mu, n nu)`` per entry and channel combines them
exactly (:class:`mmcbn.stats_source.AllReduceStats`), and the backward
all-reduces the two per-channel gradient sums, as ``SyncBatchNorm`` does.

Everything else is CBN's: the layer is a CBN layer whose statistics source
is the process group. Outside a distributed run (not initialized, or one
process) it is exactly CBN.

Consistency rules (every process makes the same collective calls in the
same order whatever its input):

- Each training forward all-reduces one (window_at(t), 1 + 2C) tensor:
  the current entry and one entry per lag ``1 .. window_at(t) - 1``. The
  shape depends only on the configuration and the iteration, which are the
  same on every process.
- A process with an empty batch, an empty window, or a layer that could not
  bind contributes zero counts for what it lacks; entries are matched by
  lag, not by storage slot.
- Entries with a global count of 0 do not count; the others weigh equally
  (as the paper's window does, and as single-process CBN on the
  concatenated batch does).
- The backward all-reduces whenever the input needs a gradient, which is
  the same on every process of a data-parallel model (as for
  ``SyncBatchNorm``, a process whose loss does not reach the layer while
  others' does would block).
"""
import logging
from typing import Optional

import torch.distributed as dist
from mmengine.logging import print_log
from mmengine.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from .cbn import CBN1d, CBN2d, CBN3d, _CrossIterationBatchNorm
from .stats_source import LOCAL, AllReduceStats, StatsSource

_said_local = False


def _say_local_once(name: str) -> None:
    global _said_local
    if not _said_local:
        _said_local = True
        print_log(
            f'SyncCBN ({name} and the others): not in a distributed run, or '
            'one process only; it is CBN.',
            logger='current',
            level=logging.INFO)


class _SyncCrossIterationBatchNorm(_CrossIterationBatchNorm):
    """CBN whose window entries are combined over a process group.

    Args:
        process_group (ProcessGroup, optional): The processes to combine;
            None is the default (world) group. Defaults to None.
        **kwargs: The CBN arguments (see :class:`mmcbn.CBN2d`).
    """

    def __init__(self, num_features: int, *args,
                 process_group: Optional[object] = None, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        if process_group is not None and not isinstance(
                process_group, dist.ProcessGroup):
            raise ValueError(
                'SyncCBN process_group must be None or a '
                'torch.distributed ProcessGroup, got '
                f'{process_group!r}')
        self.process_group = process_group

    def _stats_source(self) -> StatsSource:
        if not (dist.is_available() and dist.is_initialized()) or \
                dist.get_world_size(self.process_group) < 2:
            _say_local_once(self._name())
            return LOCAL
        # the running mean is identical on every process (it follows the
        # global statistics), so it is a shared shift for the sums
        shift = self.running_mean if self.track_running_stats else None
        return AllReduceStats(self.process_group, shift)

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            '' if self.process_group is None else ', process_group=custom')


class SyncCBN1d(_SyncCrossIterationBatchNorm, CBN1d, _BatchNorm):
    """SyncCBN for (N, C) or (N, C, L) inputs. Registered as ``SyncCBN1d``."""


class SyncCBN2d(_SyncCrossIterationBatchNorm, CBN2d, _BatchNorm):
    """Cross-iteration and cross-process batch normalization for
    (N, C, H, W) inputs.

    Registered as ``SyncCBN`` and ``SyncCBN2d``: ``norm_cfg=dict(
    type='SyncCBN', window=4, burnin=...)``. See
    :class:`_SyncCrossIterationBatchNorm` and :class:`mmcbn.CBN2d`.
    """


class SyncCBN3d(_SyncCrossIterationBatchNorm, CBN3d, _BatchNorm):
    """SyncCBN for (N, C, D, H, W) inputs. Registered as ``SyncCBN3d``."""


SyncCBN = SyncCBN2d

MODELS.register_module('SyncCBN', module=SyncCBN2d)
MODELS.register_module('SyncCBN1d', module=SyncCBN1d)
MODELS.register_module('SyncCBN2d', module=SyncCBN2d)
MODELS.register_module('SyncCBN3d', module=SyncCBN3d)
