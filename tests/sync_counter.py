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
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in HOST_READS:
            self._patched[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name,
                    self._counting(name, getattr(torch.Tensor, name)))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, own in self._patched.items():
                if own is None:
                    delattr(torch.Tensor, name)  # inherited again
                else:
                    setattr(torch.Tensor, name, own)
            self._patched = {}

    def _counting(self, name, method):
        counter = self

        def counted(tensor, *args, **kwargs):
            counter.record(f'Tensor.{name}')
            return method(tensor, *args, **kwargs)

        return counted

    @property
    def total(self) -> int:
        return sum(self.ops.values())
