# Copyright (c) mmcbn contributors. All rights reserved.
from .cpu_autocast_wrapper import CPUAutocastOptimWrapper

__all__ = ['CPUAutocastOptimWrapper']
