# Copyright (c) mmcbn contributors. All rights reserved.
"""A runner hook that re-estimates the running statistics of the BN-style
layers exactly before validation and checkpointing ("precise BN")."""
import copy
import logging
from itertools import count
from typing import Any, Dict, Iterator, Optional, Sequence, Union

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn
from torch.utils.data import DataLoader

from ..precise_stats import (check_normalize, preserved_rng,
                             recompute_statistics)

DATA_BATCH = Optional[Union[dict, tuple, list]]
#: The message hub scalar holding the seconds of the last pass.
TIME_KEY = 'train/precise_stats_time'


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'PreciseStatsHook {name} must be an integer >= 1, '
                         f'got {value!r}')
    return value


def train_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``batch`` through an mmengine model's training path
    (``data_preprocessor(batch, True)``, then ``mode='loss'``), as
    ``train_step`` does, without the optimizer step."""
    data = model.data_preprocessor(batch, True)
    if isinstance(data, dict):
        return model(**data, mode='loss')
    if isinstance(data, (list, tuple)):
        return model(*data, mode='loss')
    return model(data, mode='loss')


@HOOKS.register_module()
class PreciseStatsHook(Hook):
    """Re-estimate the running statistics of every BN-style layer exactly
    from ``num_batches`` training batches (:func:`mmcbn.recompute_statistics`),
    every ``interval`` epochs or iterations and at the end of training.

    It runs in ``after_train_epoch`` (``by_epoch=True``) or
    ``after_train_iter``, with priority ``'ABOVE_NORMAL'``: before the
    ``CheckpointHook`` (``'VERY_LOW'``) of the same stage, so the checkpoint
    saved then and the validation that follows see the re-estimated
    statistics. The last epoch (iteration) always gets a pass; if training
    ends elsewhere (an early stop, or ``by_epoch`` not matching the loop) it
    runs in ``after_train``.

    The batches come from a dataloader of the hook's own, built once in
    ``before_train``, never from the training loop's (iterating that one
    would change what training sees); the pass leaves the training run's
    random numbers, data order and every other piece of model state as they
    were. Its cost is ``num_batches`` forward passes without gradients.

    Args:
        num_batches (int): Batches per process per pass. Defaults to 200.
        interval (int): Epochs (``by_epoch=True``) or iterations between
            passes. Defaults to 1.
        by_epoch (bool): Whether ``interval`` counts epochs. Defaults to
            True.
        normalize (str): What the layers output during the pass:
            ``'batch'`` (each batch's own statistics, as BN in training) or
            ``'running'`` (their running statistics, as in eval). See
            :func:`mmcbn.recompute_statistics`. Defaults to ``'batch'``.
        dataloader (dict | DataLoader, optional): Where the batches come
            from: a dataloader config (built with
            ``runner.build_dataloader``) or a dataloader (not the training
            loop's). None: a fresh one built from the runner's
            ``train_dataloader`` config with ``persistent_workers=False``.
            Defaults to None.

    Raises:
        ValueError: If an option has a bad value.

    Example:
        >>> custom_hooks = [dict(type='PreciseStatsHook', num_batches=200)]
    """

    priority = 'ABOVE_NORMAL'

    def __init__(self,
                 num_batches: int = 200,
                 interval: int = 1,
                 by_epoch: bool = True,
                 normalize: str = 'batch',
                 dataloader: Optional[Union[Dict, DataLoader]] = None
                 ) -> None:
        self.num_batches = _check_int('num_batches', num_batches)
        self.interval = _check_int('interval', interval)
        if not isinstance(by_epoch, bool):
            raise ValueError('PreciseStatsHook by_epoch must be True or '
                             f'False, got {by_epoch!r}')
        self.by_epoch = by_epoch
        try:
            self.normalize = check_normalize(normalize)
        except ValueError as err:
            raise ValueError(f'PreciseStatsHook {err}') from None
        if dataloader is not None and not isinstance(
                dataloader, (dict, DataLoader)):
            raise ValueError('PreciseStatsHook dataloader must be None, a '
                             'dataloader config dict or a DataLoader, got '
                             f'{dataloader!r}')
        self.dataloader_cfg = dataloader
        self.dataloader: Optional[DataLoader] = None
        #: Iterations completed when the last pass ran (None: no pass yet).
        self.done_at: Optional[int] = None
        #: The report of the last pass (see recompute_statistics).
        self.last_report: Optional[dict] = None

    # --------------------------------------------------------------- stages
    def before_train(self, runner) -> None:
        """Build the hook's own dataloader (once)."""
        if self.dataloader is not None:
            return
        cfg = self.dataloader_cfg
        if cfg is None:
            cfg = runner.cfg.get('train_dataloader', None)
            if cfg is None:
                cfg = getattr(runner, '_train_dataloader', None)
            if not isinstance(cfg, dict):
                raise ValueError(
                    'PreciseStatsHook builds its own dataloader from the '
                    "runner's train_dataloader config, but the runner has "
                    f'{type(cfg).__name__} there, not a config dict: give '
                    'the hook a dataloader config (dataloader=dict(...))')
            cfg = copy.deepcopy(cfg)
            cfg['persistent_workers'] = False
        train_loop = getattr(runner, '_train_loop', None)
        if cfg is getattr(train_loop, 'dataloader', object()):
            raise ValueError(
                'PreciseStatsHook dataloader must not be the training '
                "loop's own dataloader (iterating it would change the "
                'batches training sees)')
        # (building a dataset or sampler may draw random numbers)
        with preserved_rng():
            self.dataloader = runner.build_dataloader(cfg, seed=runner.seed)

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: DATA_BATCH = None,
                         outputs: Optional[dict] = None) -> None:
        if self.by_epoch:
            return
        if self.every_n_train_iters(runner, self.interval) or \
                self.is_last_train_iter(runner):
            self.run_pass(runner, runner.iter + 1)

    def after_train_epoch(self, runner) -> None:
        if not self.by_epoch:
            return
        if self.every_n_epochs(runner, self.interval) or \
                self.is_last_train_epoch(runner):
            self.run_pass(runner, runner.iter)

    def after_train(self, runner) -> None:
        if self.done_at != runner.iter:
            print_log(
                'PreciseStatsHook: training ended after iteration '
                f'{runner.iter} without a pass since; re-estimating now '
                '(checkpoints saved before this point keep the earlier '
                'statistics)',
                logger='current')
            self.run_pass(runner, runner.iter)

    # ----------------------------------------------------------------- pass
    def _batches(self, runner) -> Iterator[Any]:
        """The hook's dataloader, restarted as often as ``num_batches``
        needs; each pass (and restart) with its own sampler epoch."""
        loader = self.dataloader
        sampler = getattr(loader, 'sampler', None)
        batch_sampler = getattr(loader, 'batch_sampler', None)
        for restart in count():
            for s in (sampler, getattr(batch_sampler, 'sampler', None)):
                if hasattr(s, 'set_epoch'):
                    s.set_epoch(runner.iter + restart)
            empty = True
            for batch in loader:
                empty = False
                yield batch
            if empty:
                raise ValueError('PreciseStatsHook: its dataloader yields '
                                 'no batch')

    def run_pass(self, runner, done_at: Optional[int] = None) -> dict:
        """Re-estimate the statistics now; log and record the time.

        Args:
            runner (Runner): The runner.
            done_at (int, optional): Iterations completed (to know in
                ``after_train`` whether the end had a pass). Defaults to
                ``runner.iter``.

        Returns:
            dict: The report of :func:`mmcbn.recompute_statistics`.
        """
        if self.dataloader is None:
            self.before_train(runner)
        model = runner.model
        if is_model_wrapper(model):
            model = model.module
        batches = self._batches(runner)
        try:
            report = recompute_statistics(
                model,
                batches,
                num_batches=self.num_batches,
                forward=train_forward,
                normalize=self.normalize)
        finally:
            batches.close()  # (ends the dataloader's iterator and workers)
        self.done_at = runner.iter if done_at is None else done_at
        self.last_report = report
        runner.message_hub.update_scalar(TIME_KEY, report['seconds'])
        self._log(report)
        return report

    def _log(self, report: dict) -> None:
        updated = report['updated']
        if not updated and not report['empty'] and not report['nonfinite']:
            print_log('PreciseStatsHook: the model has no BN-style layer '
                      'with running statistics in training mode; nothing to '
                      're-estimate', logger='current', level=logging.WARNING)
            return
        print_log(
            f'PreciseStatsHook: re-estimated the running statistics of '
            f'{len(updated)} layers from {report["num_batches"]} batches '
            f'({report["total_batches"]} on all processes, '
            f'normalize={self.normalize!r}) in {report["seconds"]:.2f} s',
            logger='current')
        for key, why in (('empty', 'saw no sample'),
                         ('nonfinite', 'got non-finite statistics')):
            if report[key]:
                print_log(
                    f'PreciseStatsHook: {len(report[key])} layers {why} and '
                    'keep their running statistics: ' +
                    _names(report[key]),
                    logger='current',
                    level=logging.WARNING)


def _names(names: Sequence[str], limit: int = 10) -> str:
    shown = ', '.join(names[:limit])
    return shown + (f' and {len(names) - limit} more'
                    if len(names) > limit else '')
