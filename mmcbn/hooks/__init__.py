# Copyright (c) mmcbn contributors. All rights reserved.
from .cbn_hook import CBNHook

__all__ = ['CBNHook']
