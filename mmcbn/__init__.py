# Copyright (c) mmcbn contributors. All rights reserved.
"""mmcbn: Cross-Iteration Batch Normalization for the OpenMMLab 2.x stack.

Importing mmcbn registers ``CBN``/``CBN1d``/``CBN2d``/``CBN3d`` and
``SyncCBN``/``SyncCBN1d``/``SyncCBN2d``/``SyncCBN3d``, the batch-2 baseline
``MABN``/``MABN2d`` and its weight-centred convolution ``ConvWC`` in
mmengine's root ``MODELS`` registry and ``CBNHook`` and
``PreciseStatsHook`` in its root ``HOOKS`` registry, and
allow-lists mmengine's checkpoint contents for torch's weights-only loader.
"""
from .binding import check_autograd_introspection, find_producer
from .cbn import CBN, CBN1d, CBN2d, CBN3d
from .checkpoint import load_checkpoint_file, register_safe_globals
from .control import (binding_report, binding_summary, cbn_layers,
                      name_cbn_layers, producer_parameters,
                      set_cbn_accumulation, set_cbn_epoch_length,
                      set_cbn_iteration,
                      window_statistics)
from .health import (read_cbn_flags, read_cbn_health, set_cbn_monitor)
from .hooks import CBNHook, PreciseStatsHook
from .mabn import MABN, MABN2d, ConvWC
from .sync_cbn import SyncCBN, SyncCBN1d, SyncCBN2d, SyncCBN3d
from .optim import CPUAutocastOptimWrapper
from .precise_stats import recompute_statistics
from .version import __version__

register_safe_globals()

__all__ = [
    'CBN', 'CBN1d', 'CBN2d', 'CBN3d', 'SyncCBN', 'SyncCBN1d', 'SyncCBN2d',
    'SyncCBN3d', 'MABN', 'MABN2d', 'ConvWC', 'CBNHook', 'set_cbn_iteration',
    'set_cbn_epoch_length', 'set_cbn_accumulation', 'cbn_layers',
    'name_cbn_layers',
    'binding_report', 'binding_summary', 'find_producer',
    'producer_parameters', 'window_statistics',
    'check_autograd_introspection', 'load_checkpoint_file',
    'register_safe_globals', 'CPUAutocastOptimWrapper', 'read_cbn_flags',
    'read_cbn_health', 'set_cbn_monitor', 'PreciseStatsHook',
    'recompute_statistics', '__version__'
]
