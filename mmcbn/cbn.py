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
import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.registry import MODELS
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .binding import Binding, find_producer, in_backward
from .functional import (batch_norm_with_stats, cross_iteration_norm,
                         stats_dtype)
from .window import WindowState, make_record


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) \
            or value < minimum:
        raise ValueError(
            f'CBN {name} must be an integer >= {minimum}, got {value!r}')
    return value


#: Accepted values of ``running_stats_from``.
RUNNING_STATS_SOURCES = ('batch', 'window')


class _CrossIterationBatchNorm:
    """CBN behaviour shared by the 1d/2d/3d layers (a mixin over BN).

    Args:
        num_features (int): Number of channels ``C``.
        eps (float): Added to the variance inside the square root.
            Defaults to 1e-5.
        momentum (float, optional): Running-statistics momentum, None for a
            cumulative average, as in ``nn.BatchNorm2d``. Defaults to 0.1.
        affine (bool): Learnable scale and shift. Defaults to True.
        track_running_stats (bool): Keep running statistics for eval mode.
            Defaults to True.
        window (int): Iterations averaged, the current one included; 1 is
            BatchNorm. Defaults to 8.
        burnin (int | float): Iterations (or epochs, see
            ``burnin_by_epoch``) at the start of training that use a window
            of 1. Statistics are still recorded during burn-in. Defaults to 0.
        burnin_by_epoch (bool): Whether ``burnin`` counts epochs. Converting
            needs the epoch length, which :class:`mmcbn.CBNHook` sets from
            the train dataloader (or call :func:`mmcbn.set_cbn_epoch_length`).
            Defaults to False.
        compensate (bool): Apply the Taylor compensation. False gives "naive
            CBN" (stale statistics averaged as they are), for ablations.
            Defaults to True.
        running_stats_from (str): What updates the running statistics used
            in eval mode: ``'batch'``, the current batch's statistics as
            ``nn.BatchNorm2d`` does (the method's convention), or
            ``'window'``, the window statistics the layer normalized with
            (mean and variance over the k iterations, so the variance also
            holds the spread of the batch means, which the per-batch
            variance misses). Identical during burn-in. Defaults to
            ``'batch'``.
    """

    _abbr_ = 'bn'
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
                 compensate: bool = True,
                 running_stats_from: str = 'batch',
                 device=None,
                 dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats, device, dtype)
        self.window = _check_int('window', window, 1)
        if burnin_by_epoch:
            if isinstance(burnin, bool) or not isinstance(
                    burnin, (int, float)) or not math.isfinite(burnin) \
                    or burnin < 0:
                raise ValueError('CBN burnin (epochs) must be a number >= 0, '
                                 f'got {burnin!r}')
        else:
            _check_int('burnin', burnin, 0)
        if not isinstance(compensate, bool):
            raise ValueError(
                f'CBN compensate must be True or False, got {compensate!r}')
        if running_stats_from not in RUNNING_STATS_SOURCES:
            raise ValueError(
                'CBN running_stats_from must be one of '
                f'{", ".join(map(repr, RUNNING_STATS_SOURCES))}, got '
                f'{running_stats_from!r}')
        self.burnin = burnin
        self.burnin_by_epoch = burnin_by_epoch
        self.compensate = compensate
        self.running_stats_from = running_stats_from
        self.iters_per_epoch: Optional[int] = None
        #: Name in the model, for messages (set by CBNHook or the helpers).
        self.cbn_name: Optional[str] = None
        self._iteration = -1
        self._external_iteration = False
        self._call_position = 0
        self._windows: List[WindowState] = []
        #: The binding of each call position in its last training forward.
        self.bindings: List[Optional[Binding]] = []
        self._warned: set = set()

    # ----------------------------------------------------------- iterations
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
        self._iteration = _check_int('iteration', iteration, 0)
        self._external_iteration = True
        self._call_position = 0

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

    def window_state_nbytes(self) -> int:
        """Bytes of recorded statistics held for all call positions."""
        return sum(w.nbytes() for w in self._windows)

    def reset_window(self) -> None:
        """Forget the recorded statistics (e.g. after a manual weight edit)."""
        for w in self._windows:
            w.reset()

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

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training:
            return super().forward(x)  # BatchNorm, at BatchNorm's speed
        if in_backward():
            # Activation checkpointing recomputes this call during backward.
            # The original call could not bind (grad off, or hooked saved
            # tensors), so it was BatchNorm: reproduce it, touch no state.
            return F.batch_norm(x, None, None, self.weight, self.bias, True,
                                0.0, self.eps)
        if x.numel() // x.shape[1] <= 1:
            raise ValueError(
                f'{self._name()} needs more than 1 value per channel when '
                f'training, got input of shape {tuple(x.shape)}')
        if self._external_iteration:
            position = self._call_position
            self._call_position += 1
        else:
            self._iteration += 1
            position = 0
        iteration = self._iteration
        while len(self._windows) <= position:
            self._windows.append(WindowState(self.window - 1))
            self.bindings.append(None)
        state = self._windows[position]
        if self.window == 1:  # BatchNorm: nothing to record or average
            return self._batch_norm(x)[0]
        window = self.window_at(iteration)

        binding = find_producer(x)
        self.bindings[position] = binding
        if binding.status == 'unbound':
            self._warn_once(
                'unbound', f'{self._name()} found no producing conv/linear '
                f'layer: {binding.reason}. It falls back to BatchNorm '
                '(window 1).')
            state.reset()
            return self._batch_norm(x)[0]

        prod = binding.producer
        use_comp = self.compensate and binding.status == 'bound'
        history = None
        if window > 1:
            history = state.compensated(iteration, window, binding.key,
                                        prod.weight if use_comp else None,
                                        prod.bias if use_comp else None)
        if history is None:
            y, mean_t, var_t = self._batch_norm(x)
        else:
            hist_mean, hist_nu, valid = history
            finite = torch.isfinite(hist_mean).all(1) & torch.isfinite(
                hist_nu).all(1)
            keep = valid & finite
            if not bool((finite | ~valid).all()):
                self._warn_once(
                    'nonfinite', f'{self._name()}: a compensated statistic '
                    f'of an earlier iteration is not finite at iteration '
                    f'{iteration}; that window entry is dropped.')
            hist_mean = torch.where(keep[:, None], hist_mean, 0.)
            hist_var = torch.where(keep[:, None],
                                   (hist_nu - hist_mean.square()).clamp_(0),
                                   0.)
            keep = keep.to(hist_mean.dtype)
            y, mean_t, var_t, mean_bar, var_bar, k = cross_iteration_norm(
                x, self.weight, self.bias, hist_mean, hist_var, keep,
                self.eps)
            if self.running_stats_from == 'window':
                self._update_running_stats(x, mean_bar, var_bar,
                                           batches=float(k))
            else:
                self._update_running_stats(x, mean_t, var_t)
        with torch.no_grad():
            xs = x.detach().to(stats_dtype(x))
            record = make_record(binding, xs, mean_t, var_t, self.compensate)
            if torch.isfinite(record.a_mean).all() and torch.isfinite(
                    record.a_nu).all():
                state.push(iteration, binding.key, record)
        return y

    def _batch_norm(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Plain training-mode BN; running stats updated NaN-safely.

        Returns:
            tuple[Tensor]: The output and the batch mean and variance.
        """
        y, mean_t, var_t = batch_norm_with_stats(x, self.weight, self.bias,
                                                 self.eps)
        self._update_running_stats(x, mean_t, var_t)
        return y, mean_t, var_t

    @torch.no_grad()
    def _update_running_stats(self,
                              x: Tensor,
                              mean_t: Tensor,
                              var_t: Tensor,
                              batches: float = 1.0) -> None:
        """Momentum update, as nn.BatchNorm does, from the statistics of
        ``batches`` batches of ``x``'s size (the current batch, or the
        window); the variance is made unbiased over all their values.

        A non-finite batch statistic leaves the running statistics as they
        are (and warns) instead of poisoning them.
        """
        if not self.track_running_stats or self.running_mean is None:
            return
        if not (torch.isfinite(mean_t).all() and torch.isfinite(var_t).all()):
            self._warn_once(
                'nonfinite-batch', f'{self._name()}: the batch statistics are '
                f'not finite at iteration {self._iteration}; running '
                'statistics were not updated.')
            return
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        m = batches * (x.numel() // x.shape[1])
        unbiased = var_t * (m / (m - 1))
        self.running_mean.lerp_(mean_t.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)

    def extra_repr(self) -> str:
        unit = ' epochs' if self.burnin_by_epoch else ''
        return (f'{super().extra_repr()}, window={self.window}, '
                f'burnin={self.burnin}{unit}, compensate={self.compensate}'
                + ('' if self.running_stats_from == 'batch' else
                   f', running_stats_from={self.running_stats_from!r}'))


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
