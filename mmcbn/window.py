# Copyright (c) mmcbn contributors. All rights reserved.
"""The ring of records CBN keeps from earlier iterations (storage, layout,
serialization); their compensation is :mod:`mmcbn.compensation`.

Nothing in the training step reads a tensor on the host. Which slot holds
which lag depends only on the iteration numbers the host assigned, so the
host builds that matching (a :class:`Layout` of device constants) once per
distinct layout and reuses it; each slot's sample count and whether its
record was finite stay on the device, so dropping an entry that is not
finite is tensor arithmetic too.
"""
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .compensation import (Record, WindowGradTerms,  # noqa: F401
                           compensate_slots, make_record, record_phase,
                           window_grad_terms)
from .upstream import Upstream

#: Per-slot bookkeeping tensors (not records): the samples of the entry,
#: 0 for a record that was not finite (stored as zeros, unusable).
_META = ('count', )
#: The per-channel statistics of a record, stored as one (4, C) block.
_SMALL = ('raw_mean', 'raw_var', 'a_mean', 'a_var')
#: Window layouts (device constants) kept per window: a ring of ``S`` slots
#: in steady state cycles through ``S`` of them.
_MAX_LAYOUTS = 64
#: Positions of the parameter ids (weight, bias) in a producer key.
_PARAM_ID_FIELDS = (1, 3)


def finite_rows(t: Tensor) -> Tensor:
    """Per row of a 2-D tensor: whether every value is finite (bool, (R, )).

    Three ops where ``torch.isfinite(t).all(1)`` takes six (``isfinite``
    is a composite of five): the row sum is finite exactly when its values
    are, unless they are so large that the sum overflows float32 (1e38:
    a diverged entry either way).
    """
    return t.sum(1).mul_(0) == 0


def all_finite(*tensors: Tensor) -> Tensor:
    """Whether every value of ``tensors`` is finite (0-dim bool), as
    :func:`finite_rows` (a sum that overflows counts as not finite)."""
    if all(t.shape == tensors[0].shape for t in tensors):
        total = tensors[0]
        for t in tensors[1:]:
            total = total + t
        total = total.sum()
    else:
        total = sum(t.sum() for t in tensors)
    return total.mul_(0) == 0


class Layout(NamedTuple):
    """Which slot holds which lag now, as device constants (no grad).

    It depends only on iteration numbers the host assigned, so it is built
    on the host's knowledge, once per distinct layout (a ring in steady
    state cycles through ``capacity`` of them) and reused: a training step
    spends no op on lag matching.
    """

    #: (L, S) float, 1 where lag ``e`` is held by slot ``s``.
    match: Tensor
    #: (S, ) bool, the slot holds a lag inside the window.
    in_window: Tensor
    #: (S, 1) bool, the slot is of the current accumulation cycle (used as
    #: recorded); None if none is.
    exact: Optional[Tensor]


def _without_ids(feed: Optional[tuple]) -> Optional[tuple]:
    """A feeding-norm identity without the layers' ``id``."""
    return None if feed is None else tuple(
        (f[0], ) + tuple(f[2:]) for f in feed)


class History(NamedTuple):
    """The earlier entries of a window, one row per lag ``1 .. L`` (no grad).

    ``count`` (L, ) holds the samples (0 where no usable entry), ``mean``
    and ``var`` (L, C) the compensated mean and variance (``nu - mu^2``,
    before the repair), ``raw_mean`` and ``raw_var`` (L, C) the statistics
    as recorded, and ``dropped`` (0-dim) the entries inside the window
    dropped because a compensated value was not finite. ``match`` (L, S)
    maps the lags to the ring's slots and ``slots`` holds the ring's
    buffers as they were (for the window gradient, which reads them before
    the current record is pushed); both are None for an empty history.
    """

    count: Tensor
    mean: Tensor
    var: Tensor
    raw_mean: Tensor
    raw_var: Tensor
    dropped: Tensor
    match: Optional[Tensor] = None
    slots: Optional[Dict[str, Tensor]] = None


def empty_history(lags: int, like: Tensor) -> History:
    """A history of ``lags`` rows that all do not count."""
    zeros = like.new_zeros((lags, like.shape[0]))
    return History(like.new_zeros(lags), zeros, zeros, zeros, zeros,
                   like.new_zeros((), dtype=torch.int64))


class WindowState:
    """Ring buffer of the records of the last ``capacity`` iterations.

    Entries are stacked so that compensating all of them is one batched
    product. Each slot holds its iteration and accumulation cycle (host),
    its sample count and whether its record was finite (device), so an
    entry older than the window, from another producer, or not finite is
    never used.

    Args:
        capacity (int): Number of earlier iterations kept (window - 1).
        store_dtype (torch.dtype, optional): dtype of the stored
            weight-sized ``d nu / d W`` entries; None keeps theirs.
    """

    #: Records stored in ``store_dtype`` (the weight-sized ones).
    _COMPRESSIBLE = ('var_grad', 'up_hm', 'up_hc')

    def __init__(self, capacity: int,
                 store_dtype: Optional[torch.dtype] = None) -> None:
        self.capacity = capacity
        self.store_dtype = store_dtype
        self.reset()

    def reset(self) -> None:
        """Forget every entry."""
        self.iterations: List[Optional[int]] = [None] * self.capacity
        #: The accumulation cycle of each slot's iteration.
        self.cycles: List[Optional[int]] = [None] * self.capacity
        self.key: Optional[tuple] = None
        #: The feeding norms the entries were recorded under (upstream
        #: compensation; None: none).
        self.feed: Optional[tuple] = None
        self._next = 0
        self._buffers: Dict[str, Tensor] = {}
        self._layouts: Dict[tuple, Layout] = {}
        #: A 0-dim zero of the statistics (a ``where`` operand).
        self._zero: Optional[Tensor] = None
        #: (S, 4, C): the buffers named in ``_SMALL`` are its views.
        self._small: Optional[Tensor] = None

    def __len__(self) -> int:
        """Slots holding an entry (finite or not)."""
        return sum(it is not None for it in self.iterations)

    def nbytes(self) -> int:
        """Bytes held by the stored entries."""
        return sum(b.numel() * b.element_size()
                   for b in self._buffers.values())

    def push(self, iteration: int, key: tuple, record: Record, count: int,
             cycle: Optional[int] = None,
             feed: Optional[tuple] = None) -> Tensor:
        """Store the record of ``iteration`` over the oldest entry.

        ``cycle`` is the accumulation cycle of ``iteration`` (default: the
        iteration itself): entries of the current cycle are exact.
        ``feed`` names the feeding norms of an upstream-compensated record.

        A record with a non-finite statistic is stored as zeros and marked
        unusable, decided on the device.

        Returns:
            Tensor: 0-dim bool, whether the record was finite (stored).
        """
        fields = {
            name: value
            for name, value in vars(record).items()
            if value is not None and name not in _SMALL
        }
        # the four C-vectors in one (4, C) block: checked and stored at once
        small = torch.stack([getattr(record, name) for name in _SMALL])
        ok = all_finite(small)
        if self.capacity == 0:
            return ok
        buffers = self._buffers
        dtypes = {
            name: self.store_dtype if self.store_dtype is not None and
            name in self._COMPRESSIBLE else value.dtype
            for name, value in fields.items()
        }
        if key != self.key or feed != self.feed or \
                set(fields) | set(_META) | set(_SMALL) != set(buffers) or \
                self._small is None or \
                self._small.shape[1:] != small.shape or \
                self._small.device != small.device or \
                self._small.dtype != small.dtype or \
                any(buffers[n].shape[1:] != v.shape or
                    buffers[n].device != v.device or
                    buffers[n].dtype != dtypes[n]
                    for n, v in fields.items()):
            # A new producer or a new layout: the old entries do not apply.
            self.reset()
            self.key = key
            self.feed = feed
            buffers = self._buffers = {
                name: value.new_zeros((self.capacity, ) + value.shape,
                                      dtype=dtypes[name])
                for name, value in fields.items()
            }
            self._small = small.new_zeros((self.capacity, ) + small.shape)
            for index, name in enumerate(_SMALL):
                buffers[name] = self._small[:, index]
            buffers['count'] = small.new_zeros(self.capacity)
            self._zero = small.new_zeros(())
        if iteration in self.iterations:  # the same iteration again
            slot = self.iterations.index(iteration)
        else:
            slot = self._next
            self._next = (slot + 1) % self.capacity
        zero = self._zero
        torch.where(ok, small, zero, out=self._small[slot])
        for name, value in fields.items():
            target = buffers[name][slot]
            if target.dtype == value.dtype:
                torch.where(ok, value, zero, out=target)
            else:  # converted while copied; zeroed if not finite
                target.copy_(value).masked_fill_(~ok, 0)
        # the entry's samples; 0 for a record that was not finite: unusable,
        # every window leaves it out
        torch.mul(ok, count, out=buffers['count'][slot])
        self.iterations[slot] = iteration
        self.cycles[slot] = iteration if cycle is None else cycle
        return ok

    def adopt_key(self, key: tuple, feed: Optional[tuple] = None) -> bool:
        """Take the entries over for ``key`` if it differs from theirs in
        the parameter ids only (the same producer kind, shapes, arguments
        and trainability): the producer of a copied model.

        Returns:
            bool: Whether the key was taken over.
        """
        old = self.key
        if old is None or old == key or old[0] not in ('conv', 'linear') \
                or old[0] != key[0] or len(old) != len(key):
            return False
        for index, (a, b) in enumerate(zip(old, key)):
            same = (a is None) == (b is None) if index in _PARAM_ID_FIELDS \
                else a == b
            if not same:
                return False
        if _without_ids(self.feed) != _without_ids(feed):
            return False
        self.key = key
        self.feed = feed
        return True

    def has_entries(self, iteration: int, lags: int, key: tuple,
                    feed=...) -> bool:
        """Whether some slot holds an iteration ``t - lags .. t - 1`` of
        this producer (and these feeding norms, unless ``feed`` is left
        out; host bookkeeping only)."""
        if feed is not ... and feed != self.feed:
            return False
        return key == self.key and any(self._lags_of(iteration, lags))

    def _lags_of(self, iteration: int, lags: int) -> Tuple[int, ...]:
        """Each slot's lag ``1 .. lags`` at ``iteration``, 0 where it holds
        none of the window."""
        return tuple(
            iteration - it if it is not None and 0 < iteration - it <= lags
            else 0 for it in self.iterations)

    def compensated(self,
                    iteration: int,
                    lags: int,
                    key: tuple,
                    weight: Optional[Tensor],
                    bias: Optional[Tensor],
                    cycle: Optional[int] = None,
                    upstream: Optional[Upstream] = None,
                    feed=...) -> Optional[History]:
        """The entries of lags ``1 .. lags`` at the current parameters.

        All slots are compensated at once (no gather copies), then checked,
        masked and matched to their lags as one block, by the
        :meth:`layout` the host's iteration numbers give.

        Args:
            iteration (int): The current iteration ``t``.
            lags (int): ``window - 1``: entries of iterations
                ``t - lags ... t - 1`` are used.
            key (tuple): The current producer's identity.
            weight (Tensor, optional): The producer's current weight, if
                trainable and compensated.
            bias (Tensor, optional): The producer's current bias, likewise.
            cycle (int, optional): The current accumulation cycle: entries
                of this cycle were recorded under the current weights and
                are used exactly as recorded.
            upstream (Upstream, optional): The feeding norms now: also
                compensate the entries for their change (where recorded).
            feed (tuple, optional): The feeding norms' identity, which the
                entries must have been recorded under (left out: any).

        Returns:
            History | None: One row per lag, or None if no slot belongs to
            the window (known on the host).
        """
        if (feed is not ... and feed != self.feed) or key != self.key:
            return None
        layout = self.layout(iteration, lags, cycle)
        if layout is None:  # no slot of the window holds an entry
            return None
        buf = self._buffers
        mean, var, slots = compensate_slots(buf, layout, weight, bias,
                                            upstream)
        raw_mean = buf['raw_mean']
        # one (S, 1 + 4C) block: checked, masked and matched to the lags
        # at once
        packed = torch.cat([buf['count'].unsqueeze(1).to(mean.dtype), mean,
                            var, raw_mean, buf['raw_var']], 1)
        # (an unusable record is zeros and a count of 0: dropped here are
        # the entries that compensation made non-finite)
        finite = finite_rows(packed)
        dropped = (layout.in_window > finite).sum()
        packed = torch.where(finite.unsqueeze(1), packed, self._zero)
        rows = layout.match @ packed
        c = mean.shape[1]
        return History(rows[:, 0], rows[:, 1:1 + c], rows[:, 1 + c:1 + 2 * c],
                       rows[:, 1 + 2 * c:1 + 3 * c], rows[:, 1 + 3 * c:],
                       dropped, layout.match, slots)

    def layout(self, iteration: int, lags: int,
               cycle: Optional[int] = None) -> Optional[Layout]:
        """The device constants that match the slots to lags ``1 ..
        lags`` at ``iteration`` (and mark those of accumulation cycle
        ``cycle``): built from the host's iteration numbers once per
        distinct layout, then reused (until the buffers are reallocated).
        None if no slot holds a lag of the window."""
        lag_of = self._lags_of(iteration, lags)
        if not any(lag_of):
            return None
        exact = None
        if cycle is not None and cycle in self.cycles:
            exact = tuple(
                bool(lag) and cy == cycle
                for lag, cy in zip(lag_of, self.cycles))
        key = (lags, lag_of, exact)
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) >= _MAX_LAYOUTS:
                self._layouts.clear()
            layout = self._layouts[key] = self._build_layout(
                lags, lag_of, exact)
        return layout

    def _build_layout(self, lags: int, lag_of: Tuple[int, ...],
                      exact: Optional[Tuple[bool, ...]]) -> Layout:
        # filled element by element from host ints: no copy from the host
        count = self._buffers['count']
        match = count.new_zeros((lags, self.capacity))
        in_window = torch.zeros(
            self.capacity, dtype=torch.bool, device=count.device)
        mark = None
        if exact is not None and any(exact):
            mark = torch.zeros((self.capacity, 1), dtype=torch.bool,
                               device=count.device)
        for slot, lag in enumerate(lag_of):
            if lag:
                match[lag - 1, slot].fill_(1)
                in_window[slot].fill_(True)
            if mark is not None and exact[slot]:
                mark[slot].fill_(True)
        return Layout(match, in_window, mark)

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """The entries, on the CPU, for a checkpoint."""
        return dict(
            capacity=self.capacity,
            iterations=list(self.iterations),
            cycles=list(self.cycles),
            next=self._next,
            key=self.key,
            feed=self.feed,
            buffers={k: v.detach().cpu()
                     for k, v in self._buffers.items()})

    def load_state_dict(self, state: Dict[str, Any],
                        device: torch.device) -> None:
        """Restore what :meth:`state_dict` returned (key already mapped)."""
        if state['capacity'] != self.capacity:
            raise ValueError(f'a window of {state["capacity"]} earlier '
                             f'entries cannot fill one of {self.capacity}')
        buffers = dict(state['buffers'])
        self.iterations = list(state['iterations'])
        # (windows saved before 2026-12-06 kept the slots' iterations and
        # cycles on the device too; the host's lists are all that is used)
        saved_cycles = buffers.pop('cycle', None)
        buffers.pop('iteration', None)
        # (and a usable flag per slot, now a count of 0)
        saved_ok = buffers.pop('ok', None)
        if saved_ok is not None:
            buffers['count'] = buffers['count'] * saved_ok
        if 'cycles' in state:
            self.cycles = list(state['cycles'])
        elif saved_cycles is not None:
            self.cycles = [
                None if it is None else int(cy)
                for it, cy in zip(self.iterations, saved_cycles.tolist())
            ]
        else:
            self.cycles = list(self.iterations)
        self._next = int(state['next'])
        self.key = state['key']
        self.feed = state.get('feed')
        self._buffers = {k: v.to(device) for k, v in buffers.items()}
        self._layouts = {}
        self._link_small()

    def _link_small(self) -> None:
        """Make the per-channel statistics views of one block again (after
        loading or copying, which store them apart)."""
        self._small = None
        self._zero = None if 'a_mean' not in self._buffers else \
            self._buffers['a_mean'].new_zeros(())
        if all(name in self._buffers for name in _SMALL):
            self._small = torch.stack(
                [self._buffers[name] for name in _SMALL], 1)
            for index, name in enumerate(_SMALL):
                self._buffers[name] = self._small[:, index]

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # (a pickled copy holds the views as separate tensors)
        self.__dict__.update(state)
        self._buffers = dict(self._buffers)
        self._link_small()


def entry_shapes(state: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Shapes of the per-entry tensors of a saved window (for checks)."""
    return {k: tuple(v.shape[1:]) for k, v in state['buffers'].items()}
