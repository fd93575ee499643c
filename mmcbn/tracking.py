# Copyright (c) mmcbn contributors. All rights reserved.
"""Binding a CBN call to its producer, and the bookkeeping around it (a
mixin of :class:`mmcbn.cbn._CrossIterationBatchNorm`; host-side only):
falling back with a warning when no producer is found, keeping the windows
of a copied layer, and warning when calls without a given iteration look
like one iteration of a shared head.
"""
import sys

import torch
from torch import Tensor, nn

from .binding import Binding, find_producer
from .upstream_paths import Feeding, _layer_name, find_feeding


def _full_width_only(feeding: Feeding, channels: int) -> None:
    """The exact form's matrices span the producer's whole input: a norm
    of a concatenated branch falls back there (the fast form follows
    it)."""
    narrow = [p for p in feeding.paths
              if p.start or p.channels != channels]
    if narrow:
        feeding.paths = [p for p in feeding.paths if p not in narrow]
        feeding.fallbacks += [
            f'{_layer_name(p.source.layer)} (a concatenated branch: '
            "upstream_form='fast' follows it)" for p in narrow]
        feeding.complete = False


class ProducerTracking:
    """The producer binding of a CBN layer's call positions.

    Uses the layer's ``_windows``, ``bindings``, ``_warned``,
    ``_warn_once``, ``_external_iteration``, ``_last_call``, ``_backwards``,
    ``_instance_id``, ``_rekey``, ``cbn_name`` and ``_name()``.
    """

    def _bind(self, x: Tensor, position: int) -> Binding:
        """Find the producer of ``x``; fall back (and warn) if none."""
        binding = find_producer(x)
        if self.compensate == 'upstream' and binding.status == 'bound':
            prod = binding.producer
            shape = prod.input_shape()
            if prod.groups != 1 and self.upstream_form == 'exact':
                binding.feeding = Feeding(
                    [], [f'a grouped convolution (groups={prod.groups}: '
                         "upstream_form='fast' follows it)"])
            elif shape is None:
                binding.feeding = Feeding(
                    [], ['a frozen producer weight (its input is not '
                         'saved)'])
            else:
                binding.feeding = find_feeding(prod.input_node, shape,
                                               self.upstream_feeding)
                if self.upstream_form == 'exact':
                    _full_width_only(binding.feeding, shape[1])
        self._adopt_after_copy(position, binding)
        info = self.bindings[position]
        if info is None or binding.feeding is not None or \
                info.key != binding.key or info.status != binding.status or \
                info.reason != binding.reason:
            # (else the info of the last call holds: the same producer)
            self.bindings[position] = binding.info()
        if binding.status == 'unbound':
            if 'unbound' not in self._warned:
                self._warn_once(
                    'unbound', f'{self._caller_name()} found no producing '
                    f'conv/linear layer: {binding.reason}. It falls back to '
                    'BatchNorm (window 1).')
            if torch.is_grad_enabled():
                # (under torch.no_grad, e.g. a teacher's forward, the
                # producer is unseen, not changed: keep the window)
                self._windows[position].reset()
        elif not self._external_iteration:
            self._check_calls_share_iteration(binding)
        return binding

    def _adopt_after_copy(self, position: int, binding: Binding) -> None:
        """Keep the windows of a copied layer (``copy.deepcopy``, an EMA
        model, unpickling).

        Recorded entries name their producer by its parameters' ``id``,
        which a copy changes. After a copy, the first binding of each call
        position takes the entries over if its producer has the same layout
        and trainability (the producer of a copied model is the copy of the
        original's); otherwise the window starts afresh, as before. Host
        bookkeeping only.
        """
        if self._instance_id != id(self):
            self._instance_id = id(self)
            self._rekey = set(range(len(self._windows)))
        if position in self._rekey:
            self._rekey.discard(position)
            self._windows[position].adopt_key(binding.key,
                                              binding.feed_token)

    def _check_calls_share_iteration(self, binding: Binding) -> None:
        """Warn if two calls see the same producer state with no iteration
        given: they belong to one iteration (a head shared over FPN levels)
        but are counted as two, so the levels share one window.

        The same state: the producer weight's version counter is unchanged
        (no optimizer step) and no backward pass has run through the
        previous call's producer (a backward separates iterations and the
        micro-batches of gradient accumulation, also when the step is
        skipped, as mixed precision does, or the optimizer leaves the
        weights alone). Host-side counters only: no synchronization.
        """
        prod = binding.producer
        param = None if prod is None else prod.weight_param
        if param is None or binding.status != 'bound':
            self._last_call = None
            return
        signature = (id(param), param._version, self._backwards)
        if signature == self._last_call and \
                'shared-calls' not in self._warned:
            self._warn_once(
                'shared-calls', f'{self._caller_name()} was called twice '
                'with its producer weights unchanged and no iteration '
                'given, so every call counts as an iteration. If the calls '
                'belong to one iteration (a head shared over FPN levels) '
                "they share one window. Add dict(type='CBNHook') to "
                'custom_hooks, or call mmcbn.set_cbn_iteration(model, '
                'iteration) before each training iteration.')
        self._last_call = signature
        prod.node.register_prehook(self._count_backward)

    def _count_backward(self, grad_outputs) -> None:
        """Autograd pre-hook on a producer node: a backward passed."""
        self._backwards += 1

    def _caller_name(self) -> str:
        """The layer's name for a warning from its forward: the one
        CBNHook or :func:`mmcbn.name_cbn_layers` gave, else its path in the
        outermost module on the call stack (a model trained without the
        hook), else :meth:`_name`. Walks the stack: for messages only."""
        if self.cbn_name:
            return self.cbn_name
        found = None
        frame = sys._getframe(1)
        while frame is not None:
            owner = frame.f_locals.get('self')
            if isinstance(owner, nn.Module) and owner is not self:
                found = next((name for name, module in owner.named_modules()
                              if module is self), found)
            frame = frame.f_back
        return found or self._name()
