# Copyright (c) mmcbn contributors. All rights reserved.
from .cbn_hook import CBNHook
from .precise_stats_hook import PreciseStatsHook

__all__ = ['CBNHook', 'PreciseStatsHook']
