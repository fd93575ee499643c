# Copyright (c) mmcbn contributors. All rights reserved.
"""Exact re-estimation of the running statistics of BN-style layers
("precise BN").

At 2 images per GPU the running statistics of a BatchNorm-style layer are
an exponential moving average of batch-2 statistics, so they are noisy and
lag behind the weights. :func:`recompute_statistics` replaces them with the
exact statistics of ``N`` training batches, computed with the current
weights: for every selected layer and channel it accumulates, in float64,
over all positions of all batches (and of all processes)::

    n  = number of values
    S1 = sum of x
    S2 = sum of x^2

and writes::

    running_mean = S1 / n
    running_var  = (S2 / n - (S1 / n)^2) * n / (n - 1)   (unbiased, as BN)

This is the pooled mean and variance of all the values, so the variance
includes the spread of the batch means, which an average of per-batch
variances misses. Layers whose class sets ``second_moment_only = True``
(MABN) keep no mean: for them ``running_var = S2 / n``, the pooled second
moment, and ``running_mean`` is left alone.

Nothing else changes: the BN-style layers do not run their own training
forward during the pass (a CBN layer would record the batch in its window
and advance its iteration); their forward is replaced, for the duration of
the pass only, by one that accumulates and normalizes, and every other
buffer of the model is put back as it was.
:class:`mmcbn.PreciseStatsHook` runs it in an mmengine runner.
"""
import contextlib
import random
import time
from itertools import islice
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Optional,
                    Sequence)

import torch
from mmengine.dist import all_reduce, get_world_size, is_distributed
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import autocast_off, channel_view, reduce_dims

try:
    import numpy as np
except ImportError:  # pragma: no cover (numpy comes with torch's stack)
    np = None

#: Accepted values of ``normalize``: what the selected layers output during
#: the pass.
NORMALIZE_MODES = ('batch', 'running')

_ABSENT = object()

#: ``forward(model, batch)``: how to run one batch through the model.
ForwardFn = Callable[[nn.Module, Any], Any]


def _default_forward(model: nn.Module, batch: Any) -> Any:
    return model(batch)


def second_moment_only(layer: nn.Module) -> bool:
    """Whether ``layer`` normalizes with the second moment alone (MABN):
    its class sets ``second_moment_only = True``."""
    return bool(getattr(type(layer), 'second_moment_only', False))


def _selectable(layer: nn.Module) -> bool:
    return isinstance(layer, _BatchNorm) and layer.training and \
        layer.track_running_stats and layer.running_mean is not None and \
        layer.running_var is not None


class _Pool:
    """The float64 sums of one layer's inputs during the pass, and the
    forward that collects them.

    Args:
        name (str): The layer's name in the model (for messages).
        layer (_BatchNorm): The layer.
        normalize (str): One of :data:`NORMALIZE_MODES`.
        collect (bool): Whether to accumulate (the layer is re-estimated),
            else only normalize. Defaults to True.
    """

    def __init__(self, name: str, layer: _BatchNorm, normalize: str,
                 collect: bool = True) -> None:
        self.name = name
        self.layer = layer
        self.normalize = normalize
        self.collect = collect
        self.second_moment_only = second_moment_only(layer)
        self.count = 0
        self.sum: Optional[Tensor] = None
        self.sum_sq: Optional[Tensor] = None

    def _sums_device(self, x: Tensor) -> torch.device:
        # (MPS has no float64)
        return torch.device('cpu') if x.device.type == 'mps' else x.device

    def forward(self, x: Tensor) -> Tensor:
        """Accumulate the statistics of ``x`` and return it normalized."""
        layer = self.layer
        if x.dim() < 2 or x.shape[1] != layer.num_features:
            raise ValueError(
                f'{self.name} ({type(layer).__name__}) has num_features='
                f'{layer.num_features}; its input during the statistics pass '
                f'has shape {tuple(x.shape)}')
        with autocast_off(x.device.type):
            n = x.numel() // x.shape[1]
            if n == 0:  # an empty batch (an RoI head with no RoI)
                return x.clone()
            if not self.collect and self.normalize == 'running':
                return self._normalized(x, n, None, None)
            x64 = x.detach().to(self._sums_device(x), torch.float64)
            dims = reduce_dims(x)
            sum_sq = x64.square().sum(dims)
            sum_ = None if self.second_moment_only else x64.sum(dims)
            del x64
            if self.collect:
                self._add(n, sum_, sum_sq)
            return self._normalized(x, n, sum_, sum_sq)

    def _add(self, n: int, sum_: Optional[Tensor], sum_sq: Tensor) -> None:
        self.count += n
        if self.sum_sq is None:
            self.sum_sq = sum_sq
            self.sum = sum_
        else:
            self.sum_sq += sum_sq
            if sum_ is not None:
                self.sum += sum_

    def _normalized(self, x: Tensor, n: int, sum_: Optional[Tensor],
                    sum_sq: Optional[Tensor]) -> Tensor:
        """``x`` normalized with this batch's statistics (``'batch'``) or
        the layer's running ones (``'running'``), then the affine."""
        layer = self.layer
        if self.normalize == 'batch':
            if self.second_moment_only:
                mean, var = None, sum_sq / n
            else:
                mean = sum_ / n
                var = (sum_sq / n - mean.square()).clamp_(min=0)
        else:
            mean = None if self.second_moment_only else layer.running_mean
            var = layer.running_var
        scale = (var.to(torch.float64) + layer.eps).rsqrt()
        if layer.weight is not None:
            scale = scale * layer.weight.detach().to(scale)
        scale = channel_view(scale.to(x.device, x.dtype), x)
        y = x if mean is None else x - channel_view(
            mean.to(x.device, x.dtype), x)
        y = y * scale
        if layer.bias is not None:
            y = y + channel_view(layer.bias.detach().to(x.device, x.dtype), x)
        return y

    def flat(self, device: torch.device) -> Tensor:
        """``(n, S1 (C), S2 (C))`` as one float64 vector (S1 is zeros for a
        second-moment layer)."""
        c = self.layer.num_features
        out = torch.zeros(1 + 2 * c, dtype=torch.float64, device=device)
        out[0] = self.count
        if self.sum is not None:
            out[1:1 + c] = self.sum.to(device)
        if self.sum_sq is not None:
            out[1 + c:] = self.sum_sq.to(device)
        return out


def _check_num_batches(num_batches: Any) -> None:
    if num_batches is not None and (
            isinstance(num_batches, bool) or not isinstance(num_batches, int)
            or num_batches < 1):
        raise ValueError('num_batches must be None or an integer >= 1, got '
                         f'{num_batches!r}')


def check_normalize(normalize: Any) -> str:
    """``normalize`` if it is one of :data:`NORMALIZE_MODES`.

    Raises:
        ValueError: For any other value.
    """
    if not isinstance(normalize, str) or normalize not in NORMALIZE_MODES:
        raise ValueError(f'normalize must be one of {NORMALIZE_MODES}, got '
                         f'{normalize!r}')
    return normalize


def _select(model: nn.Module, layers: Optional[Sequence[str]],
            normalize: str) -> List[_Pool]:
    """A pool for every selectable layer (the model is in training
    mode); those not in ``layers`` (when given) only normalize."""
    found = [(name or type(m).__name__, m)
             for name, m in model.named_modules() if _selectable(m)]
    if layers is None:
        return [_Pool(name, m, normalize) for name, m in found]
    if isinstance(layers, str):
        raise ValueError('layers must be a list of layer names, got the '
                         f'string {layers!r}')
    by_name = dict(found)
    modules = dict(model.named_modules())
    for name in layers:
        if name not in by_name:
            what = 'is not a module of the model' if name not in modules \
                else ('is not a BN-style layer that is in training mode '
                      'under model.train() and tracks running statistics')
            raise ValueError(f'layers: {name!r} {what}')
    chosen = set(layers)
    return [_Pool(name, m, normalize, name in chosen) for name, m in found]


@contextlib.contextmanager
def _preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Put every buffer of ``model`` back as it was after the body (the
    same tensor, the same values): a module whose training forward updates
    buffers (one that is not a ``_BatchNorm``) leaves no trace."""
    saved = [(module, name, buf, buf.clone())
             for module in model.modules()
             for name, buf in module._buffers.items() if buf is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buf, value in saved:
                module._buffers[name] = buf
                buf.copy_(value)


def _cuda_devices(model: nn.Module) -> List[int]:
    tensors = list(model.parameters()) + list(model.buffers())
    devices = {t.device.index for t in tensors if t.device.type == 'cuda'}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices.add(torch.cuda.current_device())
    return sorted(d for d in devices if d is not None)


@contextlib.contextmanager
def preserved_rng(cuda_devices: Sequence[int] = ()) -> Iterator[None]:
    """Run the body with torch's (CPU and the given CUDA devices'), Python's
    and numpy's global random states restored afterwards, so whatever it
    draws leaves the random numbers of the caller unchanged.

    Args:
        cuda_devices (Sequence[int]): CUDA device indices whose generators
            the body may use. Defaults to none.
    """
    py_state = random.getstate()
    np_state = np.random.get_state() if np is not None else None
    try:
        with torch.random.fork_rng(devices=list(cuda_devices)):
            yield
    finally:
        random.setstate(py_state)
        if np_state is not None:
            np.random.set_state(np_state)


@contextlib.contextmanager
def _replaced_forwards(pools: Sequence[_Pool]) -> Iterator[None]:
    """Route each pooled layer's calls to its :class:`_Pool` (an instance
    attribute ``forward``); put back exactly what was there."""
    saved = []
    try:
        for pool in pools:
            layer = pool.layer
            saved.append((layer, layer.__dict__.get('forward', _ABSENT)))
            layer.forward = pool.forward
        yield
    finally:
        for layer, previous in reversed(saved):
            if previous is _ABSENT:
                del layer.forward
            else:
                layer.forward = previous


@contextlib.contextmanager
def _training_mode(model: nn.Module) -> Iterator[None]:
    """``model.train()`` for the body; every module's own mode restored
    afterwards (also one a ``train()`` override left in eval mode)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train()
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def _multi_process() -> bool:
    return is_distributed() and get_world_size() > 1


def _all_reduce_sum(data: Tensor) -> Tensor:
    """Sum ``data`` over the processes of a distributed run (itself
    otherwise)."""
    if _multi_process():
        all_reduce(data, op='sum')
    return data


def recompute_statistics(model: nn.Module,
                         batches: Iterable[Any],
                         num_batches: Optional[int] = None,
                         forward: Optional[ForwardFn] = None,
                         normalize: str = 'batch',
                         layers: Optional[Sequence[str]] = None
                         ) -> Dict[str, Any]:
    """Re-estimate the running statistics of the BN-style layers of
    ``model`` exactly from ``batches``.

    The layers: every :class:`torch.nn.modules.batchnorm._BatchNorm`
    (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, mmcv's ``SyncBN``,
    :class:`mmcbn.CBN2d`, :class:`mmcbn.SyncCBN`, MABN, ...) that tracks
    running statistics and is in training mode under ``model.train()``;
    layers a ``train()`` override keeps in eval mode (mmdet's
    ``norm_eval=True``) are left alone.

    The pass runs every batch through ``model`` in training mode under
    ``torch.no_grad()``. Each of these layers then neither runs its own
    forward nor changes any state: it accumulates ``n``, the sum and the sum
    of squares of its input per channel in float64 (autocast off), and
    outputs the input normalized with the batch's own statistics
    (``normalize='batch'``, what BN does in training) or with its current
    running statistics (``'running'``, eval behaviour), then its affine.
    Layers left out by ``layers`` normalize the same way but keep their
    statistics. (``'batch'`` uses this process's batch also for
    ``SyncBatchNorm``/SyncCBN layers: they make no collective call during
    the pass.)
    In a distributed run the sums of all layers are all-reduced (one
    collective); every process then writes the same statistics. At the end
    each layer that saw values gets::

        running_mean = S1 / n
        running_var  = (S2 / n - running_mean^2) * n / (n - 1)

    (a ``second_moment_only`` layer: ``running_var = S2 / n``, mean
    untouched), cast to the buffers' dtype. Nothing else changes: every
    other buffer of the model (``num_batches_tracked``, and those a module
    that is not a ``_BatchNorm`` updates in its training forward) is put
    back as it was; CBN windows and iteration counters, the modules'
    train/eval modes, and the global random states of torch (CPU and the
    model's CUDA devices), Python and numpy (the pass may draw: dropout,
    samplers, a dataloader's seed) are as before. State a module keeps in
    plain attributes (not buffers) in its training forward is not
    protected: only the BN-style layers' forwards are replaced.

    Args:
        model (nn.Module): The model; pass the module inside a DDP-style
            wrapper, not the wrapper.
        batches (Iterable): The batches, each as ``forward`` takes it. Only
            iterated inside the pass (a dataloader's seed draw does not
            disturb the caller's random numbers).
        num_batches (int, optional): Use at most this many batches of
            ``batches`` (this process's). None: all of them. Defaults to
            None.
        forward (Callable, optional): ``forward(model, batch)`` runs one
            batch. None: ``model(batch)``. For an mmengine model use the
            training path, e.g. ``model(**model.data_preprocessor(batch,
            True), mode='loss')``, so that every norm layer the training
            sees (auxiliary heads included) gets statistics. Defaults to
            None.
        normalize (str): What the selected layers output during the pass
            (it decides what the layers after them see): ``'batch'`` or
            ``'running'``. Defaults to ``'batch'``.
        layers (Sequence[str], optional): Names (as in
            ``model.named_modules()``) of the layers to re-estimate, a
            subset of those selected as above; the others keep their
            statistics (but normalize as ``normalize`` says, and change
            nothing). None: all. Defaults to None.

    Returns:
        dict: What the pass did:

        - ``num_batches`` (int): batches run by this process.
        - ``total_batches`` (int): batches run by all processes.
        - ``updated`` (list[str]): layers whose running statistics were
          written.
        - ``empty`` (list[str]): layers that kept theirs because they saw
          no value (or a single one per channel, from which no unbiased
          variance can be estimated).
        - ``nonfinite`` (list[str]): layers that kept theirs because their
          pooled statistics were not finite.
        - ``seconds`` (float): wall time of the pass.

        With no layer to re-estimate the batches are not run (all counts
        0).

    Raises:
        ValueError: If ``batches`` is None or a tensor (not an iterable of
            batches), ``num_batches`` is not None or an integer >= 1,
            ``normalize`` is not one of :data:`NORMALIZE_MODES`, a name of
            ``layers`` is not a selectable layer, a layer's input does not
            have its number of channels, or no process had any batch.
    """
    start = time.perf_counter()
    if batches is None or isinstance(batches, Tensor):
        raise ValueError('batches must be an iterable of batches (e.g. a '
                         'dataloader or a list of tensors), got '
                         f'{type(batches).__name__}'
                         + (' (wrap a single batch in a list)'
                            if isinstance(batches, Tensor) else ''))
    _check_num_batches(num_batches)
    check_normalize(normalize)
    if forward is not None and not callable(forward):
        raise ValueError('forward must be None or a callable '
                         f'forward(model, batch), got {forward!r}')
    forward = forward or _default_forward
    report: Dict[str, Any] = dict(num_batches=0, total_batches=0, updated=[],
                                  empty=[], nonfinite=[])
    with _training_mode(model):
        pools = _select(model, layers, normalize)
        collected = [pool for pool in pools if pool.collect]
        if collected:
            with preserved_rng(_cuda_devices(model)), torch.no_grad(), \
                    _preserved_buffers(model), _replaced_forwards(pools):
                source = batches if num_batches is None else islice(
                    batches, num_batches)
                for batch in source:
                    forward(model, batch)
                    report['num_batches'] += 1
    if collected:
        _write(collected, report)
    report['seconds'] = time.perf_counter() - start
    return report


@torch.no_grad()
def _write(pools: Sequence[_Pool], report: Dict[str, Any]) -> None:
    """Pool the sums over processes and write the running statistics."""
    device = next((p.sum_sq.device for p in pools if p.sum_sq is not None),
                  pools[0].layer.running_var.device)
    flat = torch.cat([torch.tensor([float(report['num_batches'])],
                                   dtype=torch.float64, device=device)] +
                     [p.flat(device) for p in pools])
    flat = _all_reduce_sum(flat)
    offsets = [1]
    for pool in pools[:-1]:
        offsets.append(offsets[-1] + 1 + 2 * pool.layer.num_features)
    # the batch count and every layer's count in one host read
    total, *counts = flat[[0] + offsets].tolist()
    report['total_batches'] = int(total)
    if report['total_batches'] == 0:
        where = ' on every process' if _multi_process() else ''
        raise ValueError('recompute_statistics got no batch: batches was '
                         f'empty{where}')
    finite_checks = []
    results = []
    for pool, offset, n in zip(pools, offsets, counts):
        c = pool.layer.num_features
        s1 = flat[offset + 1:offset + 1 + c]
        s2 = flat[offset + 1 + c:offset + 1 + 2 * c]
        if n < 1 or (n < 2 and not pool.second_moment_only):
            report['empty'].append(pool.name)
            continue
        if pool.second_moment_only:
            mean, var = None, s2 / n
        else:
            mean = s1 / n
            var = (s2 / n - mean.square()).clamp_(min=0) * (n / (n - 1))
        results.append((pool, mean, var))
        finite_checks.append(torch.isfinite(var).all() if mean is None else
                             torch.isfinite(var).all() &
                             torch.isfinite(mean).all())
    finite = torch.stack(finite_checks).tolist() if finite_checks else []
    for (pool, mean, var), ok in zip(results, finite):
        if not ok:
            report['nonfinite'].append(pool.name)
            continue
        layer = pool.layer
        if mean is not None:
            layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
        report['updated'].append(pool.name)
