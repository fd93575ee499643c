# Copyright (c) mmcbn contributors. All rights reserved.
"""Safe loading of mmengine checkpoints on torch >= 2.6.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; since torch
2.6 that means the weights-only unpickler, which rejects what mmengine puts
into its checkpoints besides tensors, so ``--resume`` and testing fail with
"Weights only load failed". Rather than trusting every pickle
(``weights_only=False``), :func:`register_safe_globals` allow-lists exactly
the types an mmengine runner writes:

- numpy arrays, dtypes and scalars (message hub, dataset meta),
- ``mmengine.logging.HistoryBuffer`` (the message hub's scalar logs),
- the statistics methods a ``HistoryBuffer`` pickles by reference
  (``getattr(HistoryBuffer, 'mean')``), through a ``getattr`` that resolves
  those attributes of ``HistoryBuffer`` and nothing else.
"""
import os
import pickle
import zipfile
from typing import Any, Dict

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer

#: The statistics HistoryBuffer registers for itself.
_HISTORY_METHODS = frozenset(('min', 'max', 'current', 'mean'))
_NUMPY_DTYPES = (np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64,
                 np.float16, np.float32, np.float64)


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` restricted to the statistics methods of HistoryBuffer."""
    allowed = _HISTORY_METHODS | set(HistoryBuffer._statistics_methods)
    if obj is HistoryBuffer and name in allowed and callable(
            getattr(HistoryBuffer, name, None)):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'mmcbn safe loading: getattr({obj!r}, {name!r}) is not allowed; '
        'only the statistics methods of mmengine HistoryBuffer are.')


def _numpy_reconstruct():
    core = getattr(np, '_core', None) or np.core
    return core.multiarray._reconstruct, core.multiarray.scalar


def safe_globals() -> list:
    """The allow-list registered by :func:`register_safe_globals`."""
    reconstruct, scalar = _numpy_reconstruct()
    dtype_classes = [type(np.dtype(t)) for t in _NUMPY_DTYPES]
    return [
        reconstruct, scalar, np.ndarray, np.dtype, *dtype_classes,
        HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr'),
        (_history_buffer_getattr, '__builtin__.getattr')
    ]


def register_safe_globals() -> None:
    """Allow-list the types in mmengine checkpoints for weights-only loads.

    Called when :mod:`mmcbn` is imported; idempotent.
    """
    torch.serialization.add_safe_globals(safe_globals())


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint."""


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Load a checkpoint with the weights-only loader and the allow-list.

    Args:
        path (str): The checkpoint file.

    Returns:
        dict: The checkpoint.

    Raises:
        CheckpointError: With a one-line reason when ``path`` is missing,
            truncated, not a torch checkpoint, or holds something outside
            the allow-list.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: no such checkpoint file')
    register_safe_globals()
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError,
            RuntimeError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() \
            else type(err).__name__
        raise CheckpointError(
            f'{path}: not a readable checkpoint ({reason})') from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f'{path}: expected a checkpoint dict, got {type(ckpt).__name__}')
    return ckpt
