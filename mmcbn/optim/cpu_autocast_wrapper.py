# Copyright (c) mmcbn contributors. All rights reserved.
"""Mixed precision on CPU, for ``tools/train.py --amp`` without CUDA.

mmengine's ``AmpOptimWrapper`` refuses to run without a GPU. On CPU,
autocast to bfloat16 needs no loss scaling (bfloat16 has float32's
exponent range), so the forward pass only has to run under
``torch.autocast('cpu')``.
"""
from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from torch import nn

_DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16}


@OPTIM_WRAPPERS.register_module()
class CPUAutocastOptimWrapper(OptimWrapper):
    """An OptimWrapper whose forward runs under CPU autocast.

    Args:
        dtype (str): ``'bfloat16'`` (default) or ``'float16'``.
        **kwargs: Passed to :class:`mmengine.optim.OptimWrapper`.
    """

    def __init__(self, dtype: str = 'bfloat16', **kwargs) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f'CPUAutocastOptimWrapper dtype must be one of '
                             f'{sorted(_DTYPES)}, got {dtype!r}')
        super().__init__(**kwargs)
        self.cast_dtype = _DTYPES[dtype]

    @contextmanager
    def optim_context(self, model: nn.Module):
        with super().optim_context(model), torch.autocast(
                device_type='cpu', dtype=self.cast_dtype):
            yield
