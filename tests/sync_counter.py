# Copyright (c) mmcbn contributors. All rights reserved.
"""Count the operators that would stall a GPU, on any device.

On CUDA these operators wait for the device queue to drain (a
device-to-host synchronization) or copy Python data to the device. On the
CPU they are cheap, but they still reach the dispatcher, so a
``TorchDispatchMode`` sees them and a CPU test can prove a code path free
of them.

``Tensor.tolist()`` and ``Tensor.numpy()`` read a CPU tensor's memory
without any operator the dispatcher sees (on CUDA, ``tolist`` copies to the
host first and waits), so the counter also counts their calls while it is
active.

Copies between devices count too: a ``_to_copy`` to another device (``.to(
device)``, ``.cuda()``, ``.cpu()`` of a device tensor) and a ``copy_`` whose
source and destination are on different devices (on CUDA, a copy to the
host waits for the queue; a copy from pageable host memory waits as well).
On the CPU ``.cpu()`` and ``.to('cpu')`` return the tensor itself and reach
no operator, yet on a GPU they are host copies, so their calls on a CPU
tensor count while the counter is active (a device given as a
``torch.device`` object is not counted there: ``.to(x.device)`` is how
device-agnostic code keeps a tensor where it is). Same-device dtype casts
(``.double()``, ``.to(torch.float16)``, ``.to(x.device, dtype)``) do not
count.
"""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: Operators that synchronize with the host (or copy host data in).
SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), float(t), int(t)
    aten.is_nonzero.default,  # bool(t), if t
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten.equal.default,
    aten.unique_dim.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.lift_fresh.default,  # torch.tensor(python data)
    aten.lift_fresh_copy.default,
}


#: Copy operators: (destination argument, source argument) positions;
#: ``None`` for the destination means the ``device`` keyword (or the
#: source's device when absent).
_COPIES = {
    aten._to_copy.default: (None, 0),
    aten.copy_.default: (0, 1),
    aten._copy_from.default: (1, 0),
    aten._copy_from_and_resize.default: (1, 0),
}


def _device_change(func, args, kwargs) -> bool:
    """Whether a copy operator moves data between devices."""
    if func not in _COPIES:
        return False
    dst, src = _COPIES[func]
    source = args[src] if len(args) > src else None
    if not isinstance(source, torch.Tensor):
        return False
    if dst is None:
        target = (kwargs or {}).get('device')
        return target is not None and torch.device(target) != source.device
    dest = args[dst] if len(args) > dst else None
    return isinstance(dest, torch.Tensor) and dest.device != source.device


def _bool_index(func, args) -> bool:
    """``t[mask]`` (boolean-mask indexing) needs the mask's true count."""
    if func not in (aten.index.Tensor, aten.index_put.default,
                    aten.index_put_.default):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
        for i in indices or ())


#: Tensor methods that read device data on the host without an operator
#: the dispatcher sees on the CPU.
HOST_READS = ('tolist', 'numpy')


class SyncCounter(TorchDispatchMode):
    """Counts synchronizing operators run while the mode is active.

    Example:
        >>> with SyncCounter() as counter:
        ...     loss = model(x).sum(); loss.backward()
        >>> assert counter.total == 0, counter.ops
    """

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self._patched = {}

    def record(self, name: str) -> None:
        """Count one synchronizing operation (subclasses may classify)."""
        self.ops[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS or _bool_index(func, args):
            self.record(str(func))
        elif _device_change(func, args, kwargs):
            self.record(f'{func} (device change)')
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in HOST_READS:
            self._patch(name, self._counting(name, getattr(torch.Tensor,
                                                           name)))
        self._patch('cpu', self._counting_host_copy(torch.Tensor.cpu))
        self._patch('to', self._counting_to(torch.Tensor.to))
        return super().__enter__()

    def _patch(self, name, method) -> None:
        self._patched[name] = torch.Tensor.__dict__.get(name)
        setattr(torch.Tensor, name, method)

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            restore_methods(torch.Tensor, self._patched)
            self._patched = {}


    def _counting(self, name, method):
        counter = self

        def counted(tensor, *args, **kwargs):
            counter.record(f'Tensor.{name}')
            return method(tensor, *args, **kwargs)

        return counted

    def _counting_host_copy(self, method):
        """``Tensor.cpu``: a no-op on a CPU tensor (counted here, as the
        host copy it is on a GPU); from another device the dispatcher sees
        the copy."""
        counter = self

        def cpu(tensor, *args, **kwargs):
            if tensor.device.type == 'cpu':
                counter.record('Tensor.cpu')
            return method(tensor, *args, **kwargs)

        return cpu

    def _counting_to(self, method):
        """``Tensor.to('cpu')`` (a device named by a string) on a CPU
        tensor: a no-op here, a host copy on a GPU."""
        counter = self

        def to(tensor, *args, **kwargs):
            target = kwargs.get('device', args[0] if args else None)
            if isinstance(target, str) and tensor.device.type == 'cpu' and \
                    torch.device(target).type == 'cpu':
                counter.record("Tensor.to('cpu')")
            return method(tensor, *args, **kwargs)

        return to

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def restore_methods(owner: type, saved: dict) -> None:
    """Put back the methods ``saved`` maps to their own value (None: the
    class did not define it, so delete the patch: inherited again)."""
    for name, own in saved.items():
        if own is None:
            delattr(owner, name)
        else:
            setattr(owner, name, own)
