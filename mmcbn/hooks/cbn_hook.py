# Copyright (c) mmcbn contributors. All rights reserved.
"""A runner hook that keeps the CBN layers in step with the runner."""
from typing import Optional, Sequence

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..control import (binding_summary, cbn_layers, name_cbn_layers,
                       set_cbn_epoch_length, set_cbn_iteration)

DATA_BATCH = Optional[Sequence[dict]]


@HOOKS.register_module()
class CBNHook(Hook):
    """Tell every CBN layer the runner's iteration.

    Before each training iteration it calls ``start_iteration(runner.iter)``
    on every CBN layer, so burn-in and the window boundaries follow the
    runner's counter (and survive ``--resume``), and a layer called several
    times in one iteration (a head shared over FPN levels) keeps one window
    per call position. Before training it converts ``burnin`` given in
    epochs with the train dataloader's length and names the layers for
    messages; after the first iteration it logs how every CBN layer was
    bound to its producing layer.

    Recorded window statistics are not saved in checkpoints (they would
    cost up to ``window - 1`` gradient-sized tensors per layer): after a
    resume each window refills within ``window - 1`` iterations.

    Args:
        log_bindings (bool): Log the binding summary after the first
            training iteration. Defaults to True.

    Example:
        >>> custom_hooks = [dict(type='CBNHook')]
    """

    priority = 'NORMAL'

    def __init__(self, log_bindings: bool = True) -> None:
        self.log_bindings = log_bindings
        self._logged = False

    @staticmethod
    def _model(runner):
        model = runner.model
        return model.module if is_model_wrapper(model) else model

    def before_train(self, runner) -> None:
        model = self._model(runner)
        count = name_cbn_layers(model)
        if count == 0:
            runner.logger.warning(
                'CBNHook: the model has no CBN layer; the hook does nothing.')
            return
        iters_per_epoch = len(runner.train_dataloader)
        set_cbn_epoch_length(model, iters_per_epoch)
        settings = sorted({(layer.window, layer.burnin, layer.burnin_by_epoch,
                            layer.burnin_iters)
                           for _, layer in cbn_layers(model)})
        desc = '; '.join(
            f'window={w}, burnin={b}{" epochs" if by_ep else ""} '
            f'({iters} iterations)' for w, b, by_ep, iters in settings)
        runner.logger.info(f'CBNHook: {count} CBN layers, {desc}; '
                           f'{iters_per_epoch} iterations per epoch.')

    def before_train_iter(self,
                          runner,
                          batch_idx: int,
                          data_batch: DATA_BATCH = None) -> None:
        set_cbn_iteration(self._model(runner), runner.iter)

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: DATA_BATCH = None,
                         outputs: Optional[dict] = None) -> None:
        if self.log_bindings and not self._logged:
            self._logged = True
            runner.logger.info(binding_summary(self._model(runner)))
