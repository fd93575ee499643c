# Copyright (c) mmcbn contributors. All rights reserved.
"""A runner hook that keeps the CBN layers in step with the runner."""
import io
import logging
import os
import os.path as osp
import re
from typing import Any, Dict, Iterable, Optional, Sequence, Set

import torch
from mmengine.dist import (all_reduce, barrier, get_rank, get_world_size,
                           is_distributed)
from mmengine.fileio import get as fileio_get
from mmengine.fileio import put as fileio_put
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..control import (binding_summary, cbn_layers, name_cbn_layers,
                       set_cbn_accumulation, set_cbn_epoch_length,
                       set_cbn_iteration)
from ..checkpoint import (SUPERSEDED, CheckpointError, load_checkpoint_file,
                          register_safe_globals, write_atomically)
from ..health import (SUMMARY_METRICS, health_warnings, read_cbn_flags,
                      read_cbn_health, set_cbn_monitor)
from ..resume import (WindowStateMismatch, check_window_state,
                      collect_window_state, restore_window_state)

DATA_BATCH = Optional[Sequence[dict]]
#: Where the window state goes in a checkpoint (beside ``state_dict``).
CKPT_KEY = 'cbn_windows'
#: A process's window file beside checkpoint ``<checkpoint>`` in a run of
#: several processes (not ``*.pth``: not mistaken for a checkpoint).
RANK_FILE = '{checkpoint}.cbn_window.rank{rank}.pt'
_RANK_FILE_RE = re.compile(r'^(?P<checkpoint>.+)\.cbn_window\.rank'
                           r'(?P<rank>\d+)\.pt$')


def rank_file(checkpoint: str, rank: int) -> str:
    """The window file of process ``rank`` beside ``checkpoint`` (a
    checkpoint set aside as ``*.superseded`` keeps its original's)."""
    if checkpoint.endswith(SUPERSEDED):
        checkpoint = checkpoint[:-len(SUPERSEDED)]
    directory, name = osp.split(checkpoint)
    return osp.join(directory, RANK_FILE.format(checkpoint=name, rank=rank))


def _write_window_file(path: str, payload: dict) -> int:
    """Save one process's window state; atomically for a local path.

    Returns:
        int: The bytes written.
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    if '://' in path:
        fileio_put(data, path)
    else:
        write_atomically(path, data)
    return len(data)


def _read_window_file(path: str) -> dict:
    """Load one process's window state (weights-only, on the CPU)."""
    if '://' not in path:
        return load_checkpoint_file(path)
    register_safe_globals()
    return torch.load(io.BytesIO(fileio_get(path)), map_location='cpu',
                      weights_only=True)


def _multi_process() -> bool:
    return is_distributed() and get_world_size() > 1


#: Accepted values of ``CBNHook(text_log=...)``.
TEXT_LOG_STYLES = ('summary', 'full', 'none')


def log_key(name: str) -> str:
    """The logged name of a :func:`mmcbn.read_cbn_health` value:
    ``cbn_<metric>``, ``cbn_<metric>_<group>``.

    No ``/`` in it: mmdet's ``tools/analysis_tools/analyze_logs.py`` takes
    a key with ``/`` for a validation metric and drops the rest of that
    line (``step``, ``epoch``), which would leave every curve of the run,
    the loss included, empty; and it keys a value by the part after the
    last ``/``, so per-group values of different metrics would mix.
    """
    return 'cbn_' + name.replace('/', '_')


def drop_text_items(text: str, names: Iterable[str]) -> str:
    """``text`` (a line of mmengine's text log) without its ``name: value``
    items for ``names``.

    mmengine's ``LogProcessor`` writes every scalar of the message hub as
    ``name: value``, the items two spaces apart, and a value is one token.
    """
    names = sorted(set(names), key=len, reverse=True)
    if not names:
        return text
    pattern = r'(?<!\S)(?:' + '|'.join(map(re.escape, names)) + r'): \S*\s*'
    out = re.sub(pattern, '', text)
    return out.rstrip() if out != text else text


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f'CBNHook {name} must be True or False, got '
                         f'{value!r}')
    return value


def _compiles(runner) -> bool:
    """Whether the runner compiles ``train_step``: mmengine 0.10 does when
    its config has ``compile`` set to True or to a dict of options (even an
    empty one); it keeps no attribute for it."""
    if getattr(runner, '_compile', False):
        return True
    cfg = getattr(runner, 'cfg', None)
    compile_cfg = cfg.get('compile', None) if cfg is not None else None
    return compile_cfg is not None and compile_cfg is not False


@HOOKS.register_module()
class CBNHook(Hook):
    """Keep every CBN layer in step with the runner, log its health, and
    save its window state for exact resume.

    - Before each training iteration it calls
      ``start_iteration(runner.iter)`` on every CBN layer, so burn-in and the
      window boundaries follow the runner's counter, and a layer called
      several times in one iteration (a head shared over FPN levels) keeps
      one window per call position. Before training it converts ``burnin``
      given in epochs with the train dataloader's length.
    - In the iterations the ``LoggerHook`` logs, the layers compute health
      metrics on the device; the hook reads them (one host synchronization
      per log interval, none in between) into the message hub as
      ``train/cbn_<metric>`` scalars, which the json log, ``scalars.json``
      and every visualizer backend receive. The text log shows a few of
      them (``text_log``). The values are those of the logged iteration. It
      also reads the layers' event counters then, and logs each warning
      once per run.
    - It saves the window state of every layer with each checkpoint and
      restores it on ``--resume``: a resumed run continues exactly.
      ``load_from`` (fine-tuning) starts with empty windows. One process:
      the state goes into the checkpoint beside the model's state dict
      (``checkpoint['cbn_windows']``). Several processes: each process
      writes its own windows, atomically, to
      ``<checkpoint>.cbn_window.rank<r>.pt`` beside the checkpoint (for the
      checkpoints the ``CheckpointHook`` saves by its interval and at the
      end, not for best checkpoints), and the checkpoint holds only the
      list of those files; on resume each process reads its own file, so
      no process saves or loads more than its own windows. Each process
      deletes its files of checkpoints that ``max_keep_ckpts`` removed. A
      resume with another number of processes than the checkpoint's is
      rejected, naming both numbers (the windows of N processes do not
      divide among M); ``resume_window=False`` resumes with empty windows.
    - It makes the ``CheckpointHook`` write local checkpoints atomically
      (:class:`mmcbn.checkpoint.AtomicLocalBackend`), so a process killed
      while saving leaves the previous checkpoint intact.

    Args:
        log_bindings (bool): Log the binding summary after the first
            training iteration. Defaults to True.
        health (bool): Compute and log the health metrics. Defaults to True.
        health_by_group (bool): Also log each metric per layer group
            (backbone, neck, head, by module path), as
            ``cbn_<metric>_<group>``. Defaults to False.
        interval (int, optional): Read the metrics every ``interval``
            iterations instead of in the iterations the ``LoggerHook``
            logs (the text and json logs show the latest value read).
            Defaults to None: the ``LoggerHook``'s schedule, or every 50
            iterations without a ``LoggerHook``.
        save_window (bool): Save the window state with checkpoints. False
            keeps checkpoints as small as BN's; a resume then refills the
            windows within ``window - 1`` iterations. Defaults to True.
        resume_window (bool): Restore the window state on resume. A
            checkpoint whose window state does not fit the model (another
            config, another number of processes, a missing window file) is
            rejected with a message naming the first mismatch, on every
            process; set False to resume without it. Defaults to True.
        atomic_checkpoints (bool): Give the ``CheckpointHook`` the atomic
            local backend (only when it has no backend configured).
            Defaults to True.
        window_unit (str): With gradient accumulation
            (``optim_wrapper=dict(accumulative_counts=n)``), whether
            ``window`` counts ``'iteration'`` (micro-batches) or ``'cycle'``
            (optimizer steps). Either way, entries of the current cycle are
            exact (the weights have not changed). Defaults to
            ``'iteration'``.
        text_log (str): Which ``cbn_*`` values the text log shows:
            ``'summary'``, the model-wide ``cbn_window_fill``,
            ``cbn_comp_mean`` and ``cbn_batch_vs_window_var``
            (:data:`mmcbn.health.SUMMARY_METRICS` says why these) once a
            window is on, none during burn-in; ``'full'``, every value the
            hook logs (with ``health_by_group``, the per-group breakdown)
            on every line; ``'none'``, no ``cbn_*`` value. The message hub,
            the json log, ``scalars.json`` and the visualizer backends get
            every value whatever this says. mmengine's ``LogProcessor``
            has no option to leave a scalar out of the text line only, so
            for ``'summary'`` and ``'none'`` the hook wraps the runner's
            ``log_processor.get_log_after_iter`` during training and takes
            the hidden ``cbn_*`` items out of the text line it returns (its
            ``tag``, what the json log and the visualizer get, is left as
            it is). Defaults to ``'summary'``.

    Example:
        >>> custom_hooks = [dict(type='CBNHook')]
    """

    priority = 'NORMAL'

    def __init__(self,
                 log_bindings: bool = True,
                 health: bool = True,
                 health_by_group: bool = False,
                 interval: Optional[int] = None,
                 save_window: bool = True,
                 resume_window: bool = True,
                 atomic_checkpoints: bool = True,
                 window_unit: str = 'iteration',
                 text_log: str = 'summary') -> None:
        self.log_bindings = _check_bool('log_bindings', log_bindings)
        self.health = _check_bool('health', health)
        self.health_by_group = _check_bool('health_by_group',
                                           health_by_group)
        if interval is not None and (isinstance(interval, bool) or
                                     not isinstance(interval, int) or
                                     interval < 1):
            raise ValueError('CBNHook interval must be None or an integer '
                             f'>= 1, got {interval!r}')
        self.interval = interval
        self.save_window = _check_bool('save_window', save_window)
        self.resume_window = _check_bool('resume_window', resume_window)
        self.atomic_checkpoints = _check_bool('atomic_checkpoints',
                                              atomic_checkpoints)
        if window_unit not in ('iteration', 'cycle'):
            raise ValueError("CBNHook window_unit must be 'iteration' or "
                             f"'cycle', got {window_unit!r}")
        self.window_unit = window_unit
        if not isinstance(text_log, str) or text_log not in TEXT_LOG_STYLES:
            raise ValueError(
                'CBNHook text_log must be one of '
                f'{", ".join(map(repr, TEXT_LOG_STYLES))}, got {text_log!r}')
        self.text_log = text_log
        #: The cbn_* keys logged so far, and whether a window was on in the
        #: iteration they were read in (for the text log).
        self._log_keys: Set[str] = set()
        self._window_on = False
        self._log_processor = None
        self._logged = False
        self._monitoring = False
        #: What this process saved for the checkpoint about to be written
        #: (several processes): {'token', 'world_size', 'files'}.
        self._saved = None
        #: Local directories this process wrote window files to.
        self._window_dirs = []
        #: The file ``runner.load_checkpoint`` is reading.
        self._loading = None

    @staticmethod
    def _model(runner):
        model = runner.model
        return model.module if is_model_wrapper(model) else model

    @staticmethod
    def _find_hook(runner, name: str):
        for hook in getattr(runner, 'hooks', ()):
            if type(hook).__name__ == name:
                return hook
        return None

    # ------------------------------------------------------------ training
    def before_run(self, runner) -> None:
        """Gradient accumulation: tell the layers the cycle length (before
        a resume restores windows sized for it)."""
        self._watch_loads(runner)
        wrapper = getattr(runner, 'optim_wrapper', None)
        if wrapper is None or isinstance(wrapper, dict):
            return
        wrappers = [wrapper] if not hasattr(wrapper, 'optim_wrappers') \
            else list(wrapper.optim_wrappers.values())
        counts = {getattr(w, '_accumulative_counts', 1) for w in wrappers}
        model = self._model(runner)
        if len(counts) != 1 or not any(True for _ in cbn_layers(model)):
            return
        count = counts.pop()
        if count > 1:
            set_cbn_accumulation(model, count, self.window_unit == 'cycle')
            runner.logger.info(
                f'CBNHook: gradients accumulate over {count} micro-batches; '
                'entries of the same optimizer step are used exactly (no '
                f'compensation); the window counts {self.window_unit}s.')
        elif self.window_unit == 'cycle':
            runner.logger.warning(
                "CBNHook: window_unit='cycle' has no effect without "
                'gradient accumulation (accumulative_counts=1).')

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
        if _compiles(runner):
            runner.logger.warning(
                'CBNHook: the model is compiled (compile=True). Inside '
                'torch.compile there is no autograd graph to find the '
                'producing layers in, so every CBN layer runs as '
                'BatchNorm (window 1). Train without compile to use CBN.')
        if self.atomic_checkpoints:
            ckpt_hook = self._find_hook(runner, 'CheckpointHook')
            if ckpt_hook is not None and ckpt_hook.backend_args is None and \
                    ckpt_hook.file_client_args is None and '://' not in str(
                        ckpt_hook.out_dir or runner.work_dir):
                ckpt_hook.backend_args = dict(backend='mmcbn_atomic')

    def _logs_this_iter(self, runner, batch_idx: int) -> bool:
        """Whether the LoggerHook logs after this iteration."""
        logger = self._find_hook(runner, 'LoggerHook')
        if logger is None or self.interval is not None:
            return self.every_n_train_iters(runner, self.interval or 50)
        if logger.every_n_inner_iters(batch_idx, logger.interval):
            return True
        return bool(
            self.end_of_epoch(runner.train_dataloader, batch_idx) and
            (not logger.ignore_last or
             len(runner.train_dataloader) <= logger.interval))

    def before_train_iter(self,
                          runner,
                          batch_idx: int,
                          data_batch: DATA_BATCH = None) -> None:
        model = self._model(runner)
        set_cbn_iteration(model, runner.iter)
        monitor = self.health and self._logs_this_iter(runner, batch_idx)
        if monitor != self._monitoring:
            set_cbn_monitor(model, monitor)
            self._monitoring = monitor

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: DATA_BATCH = None,
                         outputs: Optional[dict] = None) -> None:
        model = self._model(runner)
        if self.log_bindings and not self._logged:
            self._logged = True
            runner.logger.info(binding_summary(model))
        if self._monitoring:
            read_cbn_flags(model)
            metrics = read_cbn_health(model, by_group=self.health_by_group)
            for name, value in metrics.items():
                runner.message_hub.update_scalar(f'train/{log_key(name)}',
                                                 value)
            self._log_keys.update(log_key(name) for name in metrics)
            self._window_on = any(
                layer.history_lags(runner.iter) > 0
                for _, layer in cbn_layers(model))
            self._filter_text_log(runner)
            health_warnings(model)
        ckpt_hook = self._find_hook(runner, 'CheckpointHook')
        if ckpt_hook is not None and not ckpt_hook.by_epoch and (
                ckpt_hook.every_n_train_iters(runner, ckpt_hook.interval,
                                              ckpt_hook.save_begin) or
                (ckpt_hook.save_last and self.is_last_train_iter(runner))):
            self._save_rank_windows(runner, ckpt_hook, runner.iter + 1)

    def after_train_epoch(self, runner) -> None:
        ckpt_hook = self._find_hook(runner, 'CheckpointHook')
        if ckpt_hook is not None and ckpt_hook.by_epoch and (
                ckpt_hook.every_n_epochs(runner, ckpt_hook.interval,
                                         ckpt_hook.save_begin) or
                (ckpt_hook.save_last and self.is_last_train_epoch(runner))):
            self._save_rank_windows(runner, ckpt_hook, runner.epoch + 1)

    def after_train(self, runner) -> None:
        read_cbn_flags(self._model(runner))  # warn about the last interval
        if self._window_dirs and _multi_process():
            # the CheckpointHook of rank 0 may have removed a checkpoint at
            # the last save: once it is done, drop this process's files of it
            barrier()
            self._remove_stale_files(keep=None)
        self._unfilter_text_log()

    # ------------------------------------------------------------ text log
    def text_log_keys(self) -> Set[str]:
        """The ``cbn_*`` keys the text log shows now (see ``text_log``)."""
        if self.text_log == 'full':
            return set(self._log_keys)
        if self.text_log == 'summary' and self._window_on:
            return {log_key(m) for m in SUMMARY_METRICS} & self._log_keys
        return set()

    def _filter_text_log(self, runner) -> None:
        """Wrap the runner's ``log_processor.get_log_after_iter`` (once) so
        that the train lines of the text log leave out the hidden keys."""
        processor = getattr(runner, 'log_processor', None)
        if self.text_log == 'full' or processor is None or \
                self._log_processor is not None:
            return
        original = processor.get_log_after_iter

        def get_log_after_iter(runner, batch_idx: int, mode: str):
            tag, log_str = original(runner, batch_idx, mode)
            if mode == 'train':
                log_str = drop_text_items(
                    log_str, self._log_keys - self.text_log_keys())
            return tag, log_str

        processor.get_log_after_iter = get_log_after_iter
        self._log_processor = (processor, get_log_after_iter)

    def _unfilter_text_log(self) -> None:
        """Give the log processor its own method back (unless something
        wrapped it after us: then our filter stays, harmlessly)."""
        if self._log_processor is None:
            return
        processor, wrapper = self._log_processor
        if vars(processor).get('get_log_after_iter') is wrapper:
            del processor.get_log_after_iter
        self._log_processor = None

    # --------------------------------------------------------- checkpoints
    def _save_rank_windows(self, runner, ckpt_hook, step: int) -> None:
        """Several processes: write this process's window state beside the
        checkpoint the ``CheckpointHook`` is about to save (a collective:
        every process calls it at the same point, before rank 0 saves)."""
        if not self.save_window or not _multi_process() or not any(
                True for _ in cbn_layers(self._model(runner))):
            return
        world, rank = get_world_size(), get_rank()
        checkpoint = ckpt_hook.file_backend.join_path(
            ckpt_hook.out_dir, ckpt_hook.filename_tmpl.format(step))
        token = (str(runner.timestamp), int(runner.iter))
        path = rank_file(checkpoint, rank)
        _write_window_file(
            path,
            dict(rank=rank, world_size=world, token=token,
                 windows=collect_window_state(self._model(runner))))
        # rank 0 writes the checkpoint only once every window file is whole
        barrier()
        self._saved = dict(
            token=token,
            world_size=world,
            files=[osp.basename(rank_file(checkpoint, r))
                   for r in range(world)])
        if '://' not in path:
            directory = osp.dirname(path) or '.'
            if directory not in self._window_dirs:
                self._window_dirs.append(directory)
            self._remove_stale_files(keep=osp.basename(path))

    def _remove_stale_files(self, keep: Optional[str]) -> None:
        """Delete this process's window files whose checkpoint is gone
        (removed by ``max_keep_ckpts``), except ``keep``."""
        rank = get_rank()
        for directory in self._window_dirs:
            if not osp.isdir(directory):
                continue
            for name in os.listdir(directory):
                match = _RANK_FILE_RE.match(name)
                if match is None or name == keep or \
                        int(match.group('rank')) != rank:
                    continue
                ckpt = osp.join(directory, match.group('checkpoint'))
                if not (osp.exists(ckpt) or osp.exists(ckpt + SUPERSEDED)):
                    os.unlink(osp.join(directory, name))

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if not self.save_window or not any(
                True for _ in cbn_layers(self._model(runner))):
            return
        saved, self._saved = self._saved, None
        if _multi_process():
            # the processes wrote their windows beside the checkpoint; a
            # checkpoint they did not (e.g. a best checkpoint after
            # validation) gets none
            if saved is not None and saved['token'][1] == runner.iter:
                checkpoint[CKPT_KEY] = saved
            return
        checkpoint[CKPT_KEY] = dict(
            ranks=[collect_window_state(self._model(runner))])

    def _watch_loads(self, runner) -> None:
        """Note which file ``runner.load_checkpoint`` reads: the window
        files of several processes lie beside it."""
        load = getattr(runner, 'load_checkpoint', None)
        if load is None or getattr(load, '_cbn_watched', False):
            return

        def load_checkpoint(filename, *args, **kwargs):
            self._loading = filename
            try:
                return load(filename, *args, **kwargs)
            finally:
                self._loading = None

        load_checkpoint._cbn_watched = True
        runner.load_checkpoint = load_checkpoint

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not getattr(runner, '_resume', False):
            return  # load_from: fine-tuning starts with empty windows
        model = self._model(runner)
        if not any(True for _ in cbn_layers(model)):
            return
        saved = checkpoint.get(CKPT_KEY)
        if not self.resume_window:
            runner.logger.info('CBNHook: resume_window=False: the CBN '
                               'windows start empty and refill.')
            return
        if saved is None:
            runner.logger.info(
                'CBNHook: the checkpoint holds no CBN window state; the '
                'windows refill within window - 1 iterations.')
            return
        error, state = None, None
        try:
            state = self._own_state(runner, saved)
            check_window_state(model, state)
        except WindowStateMismatch as err:
            error = str(err)
        failed = self._count_failures(error is not None)
        if error is None and failed:
            error = (f'{failed} other process(es) could not restore theirs '
                     '(their log names the reason)')
        if error is not None:
            raise WindowStateMismatch(
                f'CBNHook cannot resume the CBN window state: {error}. To '
                'resume without it (the windows then refill within '
                "window - 1 iterations), use dict(type='CBNHook', "
                'resume_window=False).')
        count = restore_window_state(model, state)
        print_log(
            f'CBNHook: restored the window state of {count} CBN call '
            'positions.',
            logger='current',
            level=logging.INFO)

    def _own_state(self, runner, saved: Dict[str, Any]) -> Dict[str, Any]:
        """This process's window state from the checkpoint's entry: in it
        (one process), or in this process's file beside it."""
        world, rank = get_world_size(), get_rank()
        if 'ranks' in saved:  # one process
            ranks = saved['ranks']
            if len(ranks) != world:
                raise WindowStateMismatch(
                    f'it was saved by {len(ranks)} processes and this run '
                    f'has {world}')
            return ranks[rank]
        if saved['world_size'] != world:
            raise WindowStateMismatch(
                f'it was saved by {saved["world_size"]} processes and this '
                f'run has {world}')
        source = self._loading or getattr(runner, '_load_from', None) or ''
        path = osp.join(osp.dirname(source), saved['files'][rank])
        try:
            payload = _read_window_file(path)
        except (CheckpointError, OSError) as err:
            raise WindowStateMismatch(
                f'the window file of process {rank}, {path}, is missing or '
                f'unreadable ({err})') from None
        if payload.get('rank') != rank or \
                tuple(payload.get('token', ())) != tuple(saved['token']):
            raise WindowStateMismatch(
                f'the window file {path} belongs to another checkpoint or '
                f'process (rank {payload.get("rank")!r}, saved at '
                f'{payload.get("token")!r}; the checkpoint expects rank '
                f'{rank}, {saved["token"]!r})')
        return payload['windows']

    @staticmethod
    def _count_failures(failed: bool) -> int:
        """Several processes: how many others failed (a collective), so
        that all of them stop together instead of deadlocking later."""
        if not _multi_process():
            return 0
        flags = torch.tensor([int(failed)], dtype=torch.int64)
        all_reduce(flags)
        return int(flags[0]) - int(failed)
