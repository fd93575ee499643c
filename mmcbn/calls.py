# Copyright (c) mmcbn contributors. All rights reserved.
"""Which iteration and call position a CBN training forward belongs to (a
mixin of :class:`mmcbn.cbn._CrossIterationBatchNorm`; host-side only).

Without a runner each training forward is an iteration. After
:meth:`CallPositions.start_iteration` the calls until the next one are the
call positions of one iteration (a head shared over FPN levels), each with
its own window (method note, "Iterations").
"""
from typing import Tuple

from .options import check_int


class CallPositions:
    """Iteration and call-position counting of a CBN layer.

    The layer sets ``_iteration = -1``, ``_external_iteration = False``,
    ``_call_position = 0`` and provides ``_windows`` and
    ``_add_position()``.
    """

    @property
    def iteration(self) -> int:
        """The iteration of the last training forward (-1 before any)."""
        return self._iteration

    def start_iteration(self, iteration: int) -> None:
        """Tell the layer that training iteration ``iteration`` begins.

        After the first call the layer stops counting forward calls: calls
        until the next ``start_iteration`` are call positions of the same
        iteration (a head shared over FPN levels), each with its own window.
        """
        # (plain values set in the instance's dict, past the checks of
        # nn.Module.__setattr__: every layer, every step)
        state = self.__dict__
        state['_iteration'] = check_int('iteration', iteration, 0)
        state['_external_iteration'] = True
        state['_call_position'] = 0

    def _next_call(self) -> Tuple[int, int]:
        """The call position and iteration of this training forward."""
        state = self.__dict__  # (as in start_iteration)
        if state['_external_iteration']:
            position = state['_call_position']
            state['_call_position'] = position + 1
        else:
            state['_iteration'] += 1
            position = 0
        while len(self._windows) <= position:
            self._add_position()
        return position, self._iteration
