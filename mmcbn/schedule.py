# Copyright (c) mmcbn contributors. All rights reserved.
"""Which earlier iterations a CBN layer's window uses: burn-in, the window
at an iteration, its lags and capacity, accumulation cycles (a mixin of
:class:`mmcbn.cbn._CrossIterationBatchNorm`; host-side integers only)."""
from typing import Optional, Union

from .options import check_int


class WindowSchedule:
    """The window schedule of a CBN layer (method note, "Burn-in" and
    "Gradient accumulation").

    Attributes (set by the layer): ``window``, ``burnin``,
    ``burnin_by_epoch``, ``iters_per_epoch``, ``cycle_length``,
    ``window_in_cycles`` and ``record_burnin``. A change of capacity calls
    ``self._forget_windows()``.
    """

    window: int
    burnin: Union[int, float]
    burnin_by_epoch: bool
    iters_per_epoch: Optional[int]
    cycle_length: int
    window_in_cycles: bool
    record_burnin: bool

    @property
    def burnin_iters(self) -> int:
        """Burn-in in iterations."""
        if not self.burnin_by_epoch:
            return self.burnin
        if self.iters_per_epoch is None:
            raise RuntimeError(
                f'{self._name()} has burnin={self.burnin} epochs '
                '(burnin_by_epoch=True) but does not know the epoch length: '
                "add dict(type='CBNHook') to custom_hooks, or call "
                'mmcbn.set_cbn_epoch_length(model, iters_per_epoch).')
        return int(round(self.burnin * self.iters_per_epoch))

    def window_at(self, iteration: int) -> int:
        """The window used at ``iteration`` (1 during burn-in)."""
        return 1 if iteration < self.burnin_iters else self.window

    def records_at(self, iteration: int) -> bool:
        """Whether ``iteration`` is recorded: every iteration from
        ``capacity`` before the end of burn-in on (earlier ones would be
        written over before any window reads them), or every one with
        ``record_burnin``."""
        return self.capacity > 0 and (
            self.record_burnin or
            iteration >= self.burnin_iters - self.capacity)

    def history_lags(self, iteration: int) -> int:
        """How many earlier iterations the window reaches back at
        ``iteration``: ``window - 1`` (0 in burn-in); with a window counted
        in accumulation cycles, the earlier micro-batches of this cycle and
        every micro-batch of the ``window - 1`` cycles before."""
        if self.capacity == 0 or iteration < self.burnin_iters:
            return 0
        if self.window_in_cycles:
            return (self.window - 1) * self.cycle_length + \
                iteration % self.cycle_length
        return self.window - 1

    @property
    def capacity(self) -> int:
        """Earlier iterations a window stores."""
        if self.window_in_cycles:
            return self.window * self.cycle_length - 1
        return self.window - 1

    def set_accumulation(self, cycle_length: int,
                         window_in_cycles: bool = False) -> None:
        """Gradient accumulation over ``cycle_length`` micro-batches.

        Inside a cycle the weights do not change, so the entries of earlier
        micro-batches of the same cycle are used exactly as recorded (no
        Taylor term): the window holds the exact statistics of the
        accumulated batch. With ``window_in_cycles`` the window counts
        cycles: micro-batch ``j`` of a cycle uses the ``j`` before it and
        all micro-batches of the ``window - 1`` cycles before.
        """
        cycle_length = check_int('cycle_length', cycle_length, 1)
        before = self.capacity
        self.cycle_length = cycle_length
        self.window_in_cycles = bool(window_in_cycles) and cycle_length > 1
        if self.capacity != before:
            self._forget_windows()
