# Copyright (c) mmcbn contributors. All rights reserved.
"""Checkpoints: safe loading on torch >= 2.6, and writes that cannot be torn.

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
import re
import tempfile
import zipfile
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from mmengine.fileio import LocalBackend, register_backend
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


# ----------------------------------------------------------------- writing
class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend, with writes that cannot be torn.

    - ``put``/``put_text`` write to a temporary file in the same directory,
      flush it to disk and rename it over the target: a reader (or
      ``--resume``) sees the old file or the new one, never a part.
    - ``remove`` of a checkpoint (``*.pth``) renames it to
      ``<name>.superseded`` and deletes it only once the next checkpoint in
      that directory is complete, so ``max_keep_ckpts`` (which removes the
      oldest checkpoint *before* writing the next) cannot leave a run with
      no checkpoint when the process dies mid-write.

    Registered as ``mmcbn_atomic``; :class:`mmcbn.CBNHook` gives it to the
    runner's ``CheckpointHook`` when that writes to local files.
    """

    def put(self, obj: bytes, filepath) -> None:
        self._write(filepath, obj)

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        self._write(filepath, obj.encode(encoding))

    @staticmethod
    def _write_data(f, data: bytes) -> None:
        f.write(data)

    def _write(self, filepath, data: bytes) -> None:
        filepath = os.fspath(filepath)
        write_atomically(filepath, data, self._write_data)
        if filepath.endswith('.pth'):
            directory = os.path.dirname(filepath) or '.'
            for name in os.listdir(directory):
                if name.endswith('.pth' + SUPERSEDED):
                    os.unlink(os.path.join(directory, name))

    def remove(self, filepath) -> None:
        filepath = os.fspath(filepath)
        if filepath.endswith('.pth') and os.path.isfile(filepath):
            os.replace(filepath, filepath + SUPERSEDED)
        else:
            super().remove(filepath)


#: Suffix of a checkpoint removed before its successor was complete.
SUPERSEDED = '.superseded'


def write_atomically(filepath: str, data: bytes,
                     write: Optional[Callable] = None) -> None:
    """Write ``data`` to a local ``filepath`` that cannot be torn.

    The bytes go to a temporary file in the same directory, which is
    flushed to disk and renamed over ``filepath``: a reader sees the old
    file or the new one, never a part.

    Args:
        filepath (str): The file to write.
        data (bytes): Its new content.
        write (callable, optional): ``write(f, data)`` writes the bytes to
            the open temporary file. Defaults to ``f.write(data)``.
    """
    filepath = os.fspath(filepath)
    directory = os.path.dirname(filepath) or '.'
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix='.' + os.path.basename(filepath) + '.', suffix='.tmp',
        dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            if write is None:
                f.write(data)
            else:
                write(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filepath)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


register_backend('mmcbn_atomic', AtomicLocalBackend, force=True)


def is_complete_checkpoint(path: str) -> bool:
    """Whether ``path`` is a whole torch checkpoint (its zip directory,
    written last, is intact); reads the directory, not the tensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    return any(name.endswith('data.pkl') for name in names)


def _step_of(name: str) -> Tuple[int, int]:
    match = re.match(r'^(epoch|iter)_(\d+)\.pth', name)
    return (0, -1) if match is None else (
        1 if match.group(1) == 'iter' else 0, int(match.group(2)))


def find_latest_complete_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint ``--resume`` should continue from.

    ``last_checkpoint`` (mmengine's pointer) when it names a complete file;
    otherwise the newest complete ``epoch_N.pth``/``iter_N.pth`` (or one
    set aside by :class:`AtomicLocalBackend`) in ``work_dir``. A file torn
    by a killed process is never chosen.

    Returns:
        str | None: The path, or None if there is no complete checkpoint.
    """
    pointer = os.path.join(work_dir, 'last_checkpoint')
    if os.path.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        if named and is_complete_checkpoint(named):
            return named
    if not os.path.isdir(work_dir):
        return None
    candidates = [
        name for name in os.listdir(work_dir)
        if re.match(r'^(epoch|iter)_\d+\.pth(' + re.escape(SUPERSEDED) +
                    ')?$', name)
    ]
    for name in sorted(candidates, key=_step_of, reverse=True):
        path = os.path.join(work_dir, name)
        if is_complete_checkpoint(path):
            return path
    return None
