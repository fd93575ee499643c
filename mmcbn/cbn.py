# Copyright (c) mmcbn contributors. All rights reserved.
"""Cross-Iteration Batch Normalization layers (Yao et al., CVPR 2021).

``CBN`` (alias ``CBN2d``), ``CBN1d`` and ``CBN3d`` are BatchNorm layers: the
same parameters, buffers, eval-mode behaviour and class hierarchy (they
subclass ``nn.BatchNorm{1,2,3}d``), so BN checkpoints load into them, their
checkpoints load into BN models, and everything that special-cases BN
(``norm_eval``, weight-decay multipliers, init configs, mmcv's ``bn`` name)
treats them as BN. Only training-mode statistics differ: they are averaged
over the last ``window`` iterations, each compensated for the change of the
producing layer's parameters since it was recorded.
"""
import logging
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.registry import MODELS
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .binding import Binding, BindingInfo, in_backward
from .calls import CallPositions
from .functional import (WindowGrad, autocast_off, batch_stats, stats_dtype,
                         window_norm)
from .health import DROPPED, NOT_STORED, NUM_FLAGS, observe
from .options import (STORE_DTYPES, UPSTREAM_FEEDING, check_bn_args,
                      check_window_args)
from .running_stats import RunningStatistics
from .schedule import WindowSchedule
from .stats_source import LOCAL, StatsSource
from .tracking import ProducerTracking
from .upstream import (NormOutput, enable_marks, mark_output, upstream_now,
                       upstream_params)
from .upstream_fast import squared_weight
from .compensation import make_record, record_phase, window_grad_terms
from .window import WindowState, empty_history


class _CrossIterationBatchNorm(WindowSchedule, CallPositions,
                               ProducerTracking, RunningStatistics):
    """CBN behaviour shared by the 1d/2d/3d layers (a mixin over BN).

    Args:
        num_features (int): Number of channels ``C``.
        eps (float): Added to the variance inside the square root (a
            number > 0). Defaults to 1e-5.
        momentum (float, optional): Running-statistics momentum in [0, 1],
            None for a cumulative average, as in ``nn.BatchNorm2d``.
            Defaults to 0.1.
        affine (bool): Learnable scale and shift. Defaults to True.
        track_running_stats (bool): Keep running statistics for eval mode.
            Defaults to True.
        window (int): Iterations averaged, the current one included; 1 is
            BatchNorm. Defaults to 8.
        burnin (int | float): Iterations (or epochs, see
            ``burnin_by_epoch``) at the start of training that use a window
            of 1. The last ``window - 1`` iterations of burn-in are
            recorded, so the window is full when it ends. Defaults to 0.
        burnin_by_epoch (bool): Whether ``burnin`` counts epochs. Converting
            needs the epoch length, which :class:`mmcbn.CBNHook` sets from
            the train dataloader (or call :func:`mmcbn.set_cbn_epoch_length`).
            Defaults to False.
        compensate (bool | str): Apply the Taylor compensation for the
            producer's parameters (True, the method). ``'upstream'`` also
            compensates for what the norm layers feeding the producer
            (through ReLU and residual paths) changed since an entry was
            recorded (method note, "Upstream-normalization compensation";
            paths it cannot follow keep the producer-only compensation and
            are listed in the binding report). False gives "naive CBN"
            (stale statistics averaged as they are), for ablations.
            Defaults to True.
        running_stats_from (str): What updates the running statistics used
            in eval mode: ``'batch'``, the current batch's statistics as
            ``nn.BatchNorm2d`` does (the method's convention), or
            ``'window'``, the window statistics the layer normalized with
            (mean and variance over the k iterations, so the variance also
            holds the spread of the batch means, which the per-batch
            variance misses). Identical during burn-in. None: ``'window'``
            with ``compensate='upstream'`` (whose networks need them at
            batch 2: benchmarks/upstream_study.py), ``'batch'`` otherwise.
            Defaults to None.
        moment_stride (int): Opt-in fast compensation: estimate the
            second-moment gradient ``d nu / d W`` of a convolution from every
            ``moment_stride``-th output row and column (a random phase per
            iteration), the same weight-gradient call with that many times
            the conv's stride, about ``moment_stride ** 2`` times cheaper.
            1 is exact (the method). Defaults to 1.
        store_dtype (str, optional): Opt-in: keep the stored ``d nu / d W``
            entries in ``'bfloat16'`` (or ``'float16'``): half the window
            memory and compensation traffic; the arithmetic stays in
            float32. None keeps the statistics dtype (exact). Defaults to
            None.
        window_grad (bool): The backward rule (method note, "Gradients").
            True (the window rule): the gradient of the window statistics
            also flows into the producer's current weight and bias through
            every compensated past entry (their Taylor terms are explicit
            functions of them), which keeps the layer invariant to the
            scale and shift of the producer's weights, as BatchNorm is.
            False: the authors' rule, past entries are constants (for
            reproducing the paper; training can stall at small batches).
            None follows ``compensate``: the window rule for CBN, constant
            entries for naive CBN. ``compensate=False, window_grad=True``
            keeps the naive values but lets the gradient flow as if they
            were compensated (an ablation). Defaults to None.
        upstream_form (str): How ``compensate='upstream'`` records and
            applies its terms: ``'fast'``, vectors
            (:mod:`mmcbn.upstream_fast`: the mean term exact for the
            bilinear model, the variance term diagonal and calibrated), or
            ``'exact'``, the first-order derivative matrices (two (C_out,
            2, C_f) tensors per entry: several times the step and window
            memory of a deep residual network); ``'mean'`` is the fast
            form's mean term alone (an ablation). Defaults to 'fast'.
        upstream_feeding (int, optional): Feeding norms followed per
            producer input at most, nearest first (the others fall back).
            None: 4 for the exact form, 8 for the fast one (a ResNet-50
            stage's residual chain). Defaults to None.
    """

    _abbr_ = 'bn'
    #: Marks CBN layers for modules that must not import this one (health).
    _cross_iteration_bn = True
    _spatial_dims: int

    def __init__(self,
                 num_features: int,
                 eps: float = 1e-5,
                 momentum: Optional[float] = 0.1,
                 affine: bool = True,
                 track_running_stats: bool = True,
                 window: int = 8,
                 burnin: Union[int, float] = 0,
                 burnin_by_epoch: bool = False,
                 compensate: Union[bool, str] = True,
                 running_stats_from: Optional[str] = None,
                 moment_stride: int = 1,
                 store_dtype: Optional[str] = None,
                 window_grad: Optional[bool] = None,
                 upstream_form: str = 'fast',
                 upstream_feeding: Optional[int] = None,
                 device=None,
                 dtype=None) -> None:
        check_bn_args(eps, momentum, affine, track_running_stats)
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats, device, dtype)
        self.window = window
        if compensate == 'upstream':
            enable_marks()
        self.window_grad = check_window_args(window, burnin, burnin_by_epoch,
                                             compensate, running_stats_from,
                                             moment_stride, store_dtype,
                                             window_grad, upstream_form,
                                             upstream_feeding)
        self.upstream_form = upstream_form
        self.upstream_feeding = UPSTREAM_FEEDING[upstream_form] if \
            upstream_feeding is None else upstream_feeding
        self.moment_stride = moment_stride
        self.store_dtype = store_dtype
        self.burnin = burnin
        self.burnin_by_epoch = burnin_by_epoch
        self.compensate = compensate
        if running_stats_from is None:
            running_stats_from = 'window' if compensate == 'upstream' \
                else 'batch'
        self.running_stats_from = running_stats_from
        self.iters_per_epoch: Optional[int] = None
        #: Record every iteration of burn-in, not only its last ``window -
        #: 1`` (for tools that read the window during burn-in, e.g.
        #: benchmarks/stats_error.py; costs a record per iteration).
        self.record_burnin = False
        #: Name in the model, for messages (set by CBNHook or the helpers).
        self.cbn_name: Optional[str] = None
        #: Micro-batches per optimizer step (gradient accumulation), and
        #: whether ``window`` counts such cycles (set by CBNHook).
        self.cycle_length = 1
        self.window_in_cycles = False
        self._iteration = -1
        self._external_iteration = False
        self._call_position = 0
        self._windows: List[WindowState] = []
        #: The binding of each call position in its last training forward.
        self.bindings: List[Optional[BindingInfo]] = []
        self._warned: set = set()
        self._last_call: Optional[tuple] = None
        #: Backward passes seen through this layer's producers (counted
        #: only while no iteration is given, for the shared-call check).
        self._backwards = 0
        #: Device-side event counters and health accumulators (health.py);
        #: ``_flag_base`` is the host's part of the counters (see _flag).
        self._flags: Optional[Tensor] = None
        self._flag_base: List[int] = [0] * NUM_FLAGS
        self._health: Optional[Tensor] = None
        #: Compute health metrics in training forwards (set by CBNHook).
        self._monitor = False
        #: Whether a forward ran inside torch.compile (then as BatchNorm).
        self._compiled = False
        #: ``id(self)`` when the windows were last bound: a copy (deepcopy,
        #: an EMA model, unpickling) sees another id (see _adopt_after_copy)
        self._instance_id = id(self)
        self._rekey: set = set()

    def window_state_nbytes(self) -> int:
        """Bytes of recorded statistics held for all call positions."""
        return sum(w.nbytes() for w in self._windows)

    def reset_window(self) -> None:
        """Forget the recorded statistics (e.g. after a manual weight edit)."""
        for w in self._windows:
            w.reset()

    def _forget_windows(self) -> None:
        """Drop every call position's window and binding (a new capacity)."""
        self._windows.clear()
        self.bindings.clear()

    # ------------------------------------------------------------ the seam
    def _stats_source(self) -> StatsSource:
        """Where the window entries are combined: this process (CBN).

        :class:`mmcbn.SyncCBN` overrides this (all processes); nothing
        else in the forward depends on it.
        """
        return LOCAL

    # -------------------------------------------------------------- forward
    def _name(self) -> str:
        return self.cbn_name or (
            f'{type(self).__name__}({self.num_features})')

    def _warn_once(self, tag: str, message: str) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            print_log(message, logger='current', level=logging.WARNING)

    def _check_input(self, x: Tensor) -> None:
        expected = {1: (2, 3), 2: (4, ), 3: (5, )}[self._spatial_dims]
        if x.dim() not in expected:
            ranks = ' or '.join(f'{r}D' for r in expected)
            raise ValueError(
                f'{self._name()} expects a {ranks} input (N, C, ...), got a '
                f'{x.dim()}D input of shape {tuple(x.shape)}')
        if x.shape[1] != self.num_features:
            raise ValueError(
                f'{self._name()} has num_features={self.num_features} but '
                f'its input has {x.shape[1]} channels (shape '
                f'{tuple(x.shape)})')

    def _add_position(self) -> None:
        """A window (and binding slot) for one more call position."""
        self._windows.append(
            WindowState(self.capacity, STORE_DTYPES[self.store_dtype]))
        self.bindings.append(None)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training:
            return super().forward(x)  # BatchNorm, at BatchNorm's speed
        if torch.compiler.is_compiling():
            # dynamo traces no autograd graph to bind to: BatchNorm
            self._compiled = True
            return super().forward(x)
        source = self._stats_source()
        if in_backward():
            return self._recomputed(x, source)
        m = x.numel() // x.shape[1]
        if m == 1 and not source.distributed:
            raise ValueError(
                f'{self._name()} needs more than 1 value per channel when '
                f'training, got input of shape {tuple(x.shape)}')
        position, iteration = self._next_call()
        if m == 0 and not source.distributed:
            # BatchNorm's own behaviour on an empty batch (an RoI head with
            # no RoI): empty output, running statistics unchanged
            return super().forward(x)
        if self.capacity == 0 and not source.distributed:
            y, mean_t, var_t = self._batch_norm(x)
            self._mark(y, x, position, mean_t, var_t)
            return y
        lags = self.history_lags(iteration)
        binding = self._bind(x, position) if self.capacity > 0 else None
        bound = binding is not None and binding.status != 'unbound'
        # statistics, counts and window state stay in float32 whatever the
        # caller's autocast (the matmuls of the compensation and the lag
        # matching would otherwise run in half precision)
        with autocast_off(x.device.type):
            history = self._history(binding, position, iteration, lags) \
                if bound and lags > 0 else None
            if history is None and not source.distributed:
                y, mean_t, var_t = self._batch_norm(x)
                stats = None
                self._mark(y, x, position, mean_t, var_t)
            else:
                mean_t, var_t = batch_stats(x)
                history = history or empty_history(lags, mean_t)
                y, stats = self._window_norm(x, mean_t, var_t, history,
                                             source, binding)
                self._mark(y, x, position, stats.mean_bar, stats.var_bar,
                           stats)
            if bound and m > 0 and self.records_at(iteration):
                self._record(x, binding, position, iteration, mean_t, var_t)
            if self._monitor and self.capacity > 0:
                observe(self, history, stats, mean_t, var_t, lags)
        return y

    def _mark(self, y: Tensor, x: Tensor, position: int, mean: Tensor,
              var: Tensor, stats=None) -> None:
        """Tell the layers fed by this call what it normalized with
        (upstream compensation; references only)."""
        mark_output(
            y, lambda: NormOutput(self, position, x, mean, var, stats))

    def _recomputed(self, x: Tensor, source: StatsSource) -> Tensor:
        """Activation checkpointing recomputes this call during backward.
        The original call could not bind (grad off, or hooked saved
        tensors), so it used the current batch only: reproduce it, touch no
        state."""
        if not source.distributed:
            return F.batch_norm(x, None, None, self.weight, self.bias, True,
                                0.0, self.eps)
        mean_t, var_t = batch_stats(x)
        return window_norm(x, self.weight, self.bias, mean_t, var_t,
                           *empty_history(0, mean_t)[:3], self.eps,
                           source)[0]

    def _history(self, binding: Binding, position: int, iteration: int,
                 lags: int):
        """The earlier entries of this call position, compensated to the
        producer's current parameters (None if none is in the window)."""
        prod = binding.producer
        use_comp = self.compensate and binding.status == 'bound' and \
            prod is not None
        feed = binding.feed_token
        upstream = None
        if feed is not None:
            upstream = binding.upstream_now = upstream_now(binding.feeding,
                                                           lags)
            if self.upstream_form != 'exact':
                upstream.weight = self._weight_now(prod)
                upstream.weight_sq = squared_weight(upstream.weight)
                upstream.groups = prod.groups
        return self._windows[position].compensated(
            iteration, lags, binding.key, prod.weight if use_comp else None,
            prod.bias if use_comp else None,
            cycle=iteration // self.cycle_length, upstream=upstream,
            feed=feed)

    @staticmethod
    def _weight_now(prod) -> Tensor:
        """The producer's weight now, detached, at least float32."""
        weight = prod.weight if prod.weight is not None else \
            prod.weight_value(torch.float32)
        return weight if weight.dtype == torch.float64 else weight.float()

    def _window_norm(self, x: Tensor, mean_t: Tensor, var_t: Tensor,
                     history, source: StatsSource,
                     binding: Optional[Binding] = None):
        """Normalize with the window's statistics; update the running ones
        from what the source combined."""
        y, stats = window_norm(x, self.weight, self.bias, mean_t, var_t,
                               history.count, history.mean, history.var,
                               self.eps, source,
                               self._window_grad(history, binding))
        if self.running_stats_from == 'window':
            self._update_running_stats(
                stats.mean_bar, stats.var_bar,
                torch.where(stats.keep, stats.count, 0.).sum())
        else:  # (a host count where it is this process's batch)
            self._update_running_stats(
                stats.mean[0], stats.var[0], stats.count[0]
                if source.distributed else x.numel() // x.shape[1])
        self._flag(DROPPED, history.dropped)
        return y, stats

    def _window_grad(self, history, binding: Optional[Binding]
                     ) -> Optional[WindowGrad]:
        """Where the window gradient goes, or None (the authors' rule, no
        past entry, or no trainable producer)."""
        if not self.window_grad or history.match is None or \
                binding is None or binding.status != 'bound':
            return None
        prod = binding.producer
        weight, bias = prod.live_weight, prod.live_bias
        weight = weight if weight is not None and weight.requires_grad \
            else None
        bias = bias if bias is not None and bias.requires_grad else None
        upstream = ()
        if 'up_dgamma' in history.slots:
            upstream = tuple(upstream_params(binding.feeding))
        if weight is None and bias is None and not upstream:
            return None
        slots, match, raw_mean = history.slots, history.match, \
            history.raw_mean

        def terms(lag_weight, lag_mean, lag_pos, mean_bar, need_weight,
                  need_upstream):
            return window_grad_terms(slots, match, lag_weight, lag_mean,
                                     lag_pos, raw_mean, mean_bar,
                                     need_weight, need_upstream,
                                     need_bias=bias is not None,
                                     upstream=binding.upstream_now)

        return WindowGrad(weight, bias, terms, upstream)

    @torch.no_grad()
    def _record(self, x: Tensor, binding: Binding, position: int,
                iteration: int, mean_t: Tensor, var_t: Tensor) -> None:
        """Store this iteration's statistics with what compensation needs."""
        stride = self.moment_stride
        phase = tuple(
            record_phase(iteration, position, d, stride)
            for d in range(x.dim() - 2)) if stride > 1 else ()
        record = make_record(binding, x.detach().to(stats_dtype(x)), mean_t,
                             var_t, self.compensate, stride, phase,
                             derivatives=self.window_grad,
                             upstream_form=self.upstream_form)
        ok = self._windows[position].push(iteration, binding.key, record,
                                          x.numel() // x.shape[1],
                                          iteration // self.cycle_length,
                                          binding.feed_token)
        self._flag(NOT_STORED, ok, complement=True)

    def _flag(self, index: int, value: Tensor,
              complement: bool = False) -> None:
        """Count ``value`` events on the device (read by
        :func:`read_cbn_flags`). ``complement``: count one event where the
        0-dim bool ``value`` is False, as 1 on the host minus ``value`` on
        the device (no negation op)."""
        if self._flags is None or self._flags.device != value.device:
            self._flags = torch.zeros(
                NUM_FLAGS, dtype=torch.int64, device=value.device)
            self._flag_base = [0] * NUM_FLAGS
        if complement:
            self._flag_base[index] += 1
            self._flags[index].add_(value, alpha=-1)
        else:
            self._flags[index].add_(value)

    def extra_repr(self) -> str:
        unit = ' epochs' if self.burnin_by_epoch else ''
        extra = [f'running_stats_from={self.running_stats_from!r}'] if \
            self.running_stats_from != 'batch' else []
        if self.moment_stride != 1:
            extra.append(f'moment_stride={self.moment_stride}')
        if self.store_dtype is not None:
            extra.append(f'store_dtype={self.store_dtype!r}')
        if self.window_grad != bool(self.compensate):
            extra.append(f'window_grad={self.window_grad}')
        if self.compensate == 'upstream':
            extra.append(f'upstream_form={self.upstream_form!r}')
            if self.upstream_feeding != UPSTREAM_FEEDING[self.upstream_form]:
                extra.append(f'upstream_feeding={self.upstream_feeding}')
        return (f'{super().extra_repr()}, window={self.window}, '
                f'burnin={self.burnin}{unit}, compensate={self.compensate!r}' +
                ''.join(', ' + e for e in extra))


class CBN1d(_CrossIterationBatchNorm, nn.BatchNorm1d, _BatchNorm):
    """CBN for (N, C) or (N, C, L) inputs, e.g. after ``nn.Linear``.

    Registered as ``CBN1d``. See :class:`_CrossIterationBatchNorm` for the
    arguments.
    """

    _spatial_dims = 1


class CBN2d(_CrossIterationBatchNorm, nn.BatchNorm2d, _BatchNorm):
    """Cross-Iteration Batch Normalization for (N, C, H, W) inputs.

    Registered as ``CBN`` and ``CBN2d``: ``norm_cfg=dict(type='CBN',
    window=8, burnin=...)``. In eval mode it is ``nn.BatchNorm2d``. See
    :class:`_CrossIterationBatchNorm` for the arguments.
    """

    _spatial_dims = 2


class CBN3d(_CrossIterationBatchNorm, nn.BatchNorm3d, _BatchNorm):
    """CBN for (N, C, D, H, W) inputs. Registered as ``CBN3d``."""

    _spatial_dims = 3


# ``_BatchNorm`` is also listed as a direct base above (redundant for Python's
# MRO) because mmengine's init configs match ``layer=['_BatchNorm', ...]``
# against the direct bases' names only.

CBN = CBN2d
CBN_LAYERS = (CBN1d, CBN2d, CBN3d)

MODELS.register_module('CBN', module=CBN2d)
MODELS.register_module('CBN1d', module=CBN1d)
MODELS.register_module('CBN2d', module=CBN2d)
MODELS.register_module('CBN3d', module=CBN3d)
