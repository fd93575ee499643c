# Copyright (c) mmcbn contributors. All rights reserved.
"""What CBN is doing in a run: device-side flags and health metrics.

Nothing here synchronizes during a training step. The layers count events
(non-finite entries dropped, running-statistics updates skipped, records not
stored) in small device tensors, and compute health metrics only in the
iterations they are asked to monitor (:class:`mmcbn.CBNHook` asks for the
iterations it logs). The host reads both at once where a synchronization is
free anyway: the hook's log interval, :func:`mmcbn.binding_report`, or a
call of :func:`read_cbn_flags` / :func:`read_cbn_health` after a step.

Health metrics, per layer and call position, averaged over the monitored
calls since the last read:

- ``window_fill``: earlier entries used / entries a full window holds (0
  in burn-in, 1 with a full window);
- ``repaired_frac``: fraction of (earlier entry, channel) pairs whose
  compensated variance was negative and needed the ``max(nu, mu^2)``
  repair;
- ``comp_mean``: size of the mean compensation, ``|mu_comp - mu_recorded|``,
  relative to the batch's standard deviation;
- ``comp_nu``: size of the second-moment compensation,
  ``|nu_comp - nu_recorded|``, relative to the batch's variance;
- ``batch_vs_window_mean``: ``|mu_batch - mu_window|`` relative to the
  window's standard deviation;
- ``batch_vs_window_var``: ``|log(var_batch / var_window)|``.

A monitored call whose statistics are not finite (a NaN/Inf batch) adds
nothing to any metric, so one bad iteration does not turn the metrics of a
log interval into NaN; the ``skipped``/``not_stored`` event counters report
it.
"""
import logging
from collections import OrderedDict, defaultdict
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from mmengine.logging import print_log
from torch import Tensor, nn

#: Device-side event counters of a layer.
DROPPED, SKIPPED, NOT_STORED = range(3)
NUM_FLAGS = 3
_FLAG_MESSAGES = {
    DROPPED: '{n} compensated statistics of earlier iterations were not '
    'finite; those window entries were dropped',
    SKIPPED: 'the batch statistics were not finite in {n} training '
    'iterations; running statistics were not updated then',
    NOT_STORED: 'the batch statistics of {n} iterations were not finite '
    'and were not stored in the window',
}

#: Accumulator slots of the health metrics: (sum, count) pairs.
_FILL, _FILL_N, _REP, _REP_N, _CMEAN, _CNU, _COMP_N, _DMEAN, _DVAR, \
    _DIST_N = range(10)
NUM_HEALTH = 10
#: Metric name -> (sum slot, count slot).
METRICS = OrderedDict(
    window_fill=(_FILL, _FILL_N),
    repaired_frac=(_REP, _REP_N),
    comp_mean=(_CMEAN, _COMP_N),
    comp_nu=(_CNU, _COMP_N),
    batch_vs_window_mean=(_DMEAN, _DIST_N),
    batch_vs_window_var=(_DVAR, _DIST_N),
)

#: The metrics :class:`mmcbn.CBNHook` shows in the text log by default
#: (``text_log='summary'``), model-wide, once the window is on; the
#: message hub, the json log and the visualizer backends get every metric.
#: One per question a reader of the log asks:
#:
#: - ``window_fill``: is the window on, and full? (below 1 after burn-in:
#:   layers fell back to BatchNorm, or windows are refilling);
#: - ``comp_mean``: is compensation sound? (the correction's size relative
#:   to the spread it corrects; near 1 the first-order estimate is no longer
#:   reliable; it grows with ``repaired_frac`` when the weights move too
#:   fast, and both have their own warnings);
#: - ``batch_vs_window_var``: does the window buy anything? (how far the
#:   batch's variance is from the window's: the noise CBN smooths away;
#:   near 0 the batches are large enough without it).
SUMMARY_METRICS = ('window_fill', 'comp_mean', 'batch_vs_window_var')

#: Thresholds of the actionable warnings (read after burn-in only).
REPAIR_WARN = 0.25
COMP_WARN = 1.0


@torch.no_grad()
def observe(layer, history, stats, mean_t: Tensor, var_t: Tensor,
            lags: int) -> None:
    """Add one monitored call's health terms to ``layer._health``.

    A call whose batch statistics or terms are not finite (a non-finite
    batch here, or, for SyncCBN, on another process) adds nothing, to any
    metric: the metrics describe the finite iterations of the interval, and
    the event counters (:func:`read_cbn_flags`) report the others. Decided
    on the device.

    Args:
        layer: The CBN layer.
        history (History | None): The earlier entries (local).
        stats (WindowStats | None): What the normalization used; None when
            it was plain BatchNorm (no earlier entry).
        mean_t (Tensor): The local batch mean; ``var_t`` its variance.
        lags (int): Earlier entries the window allows now.
    """
    if layer._health is None or layer._health.device != mean_t.device:
        layer._health = torch.zeros(
            NUM_HEALTH, dtype=torch.float64, device=mean_t.device)
    acc = layer._health.new_zeros(NUM_HEALTH)  # this call's terms
    acc[_FILL_N].fill_(1)
    finite = torch.isfinite(mean_t).all() & torch.isfinite(var_t).all()
    if stats is not None:
        _window_terms(acc, layer, history, stats, var_t, lags)
    finite &= torch.isfinite(acc).all()
    layer._health.add_(torch.where(finite, acc, 0.))


def _window_terms(acc: Tensor, layer, history, stats, var_t: Tensor,
                  lags: int) -> None:
    """The terms of a call that used earlier entries (see :func:`observe`).
    """
    eps = layer.eps
    hist_keep = stats.keep[1:]
    acc[_FILL].add_((hist_keep.sum() / max(layer.capacity, 1)))
    channels = stats.mean.shape[1]
    acc[_REP].add_(((stats.var[1:] < 0) & hist_keep.unsqueeze(1)).sum())
    acc[_REP_N].add_(hist_keep.sum() * channels)
    used = (history.count > 0).unsqueeze(1)
    spread = var_t + eps
    shift = history.mean - history.raw_mean
    comp_mean = shift.abs() / spread.sqrt()
    # nu_comp - nu_raw = (var_comp - var_raw) + shift (mean_comp + mean_raw)
    comp_nu = (history.var - history.raw_var + shift *
               (history.mean + history.raw_mean)).abs() / spread
    acc[_CMEAN].add_(torch.where(used, comp_mean, 0.).sum())
    acc[_CNU].add_(torch.where(used, comp_nu, 0.).sum())
    acc[_COMP_N].add_(used.sum() * channels)
    if lags > 0:
        var_bar = stats.var_bar + eps
        acc[_DMEAN].add_(((stats.mean[0] - stats.mean_bar).abs() /
                          var_bar.sqrt()).sum())
        acc[_DVAR].add_(torch.log(
            (stats.var[0].clamp(min=0) + eps) / var_bar).abs().sum())
        acc[_DIST_N].add_(channels)


def _layers(model: nn.Module):
    """``(name, layer)`` of every CBN layer (marked by the layer class, so
    that this module imports neither :mod:`.cbn` nor :mod:`.control`)."""
    return [(name, module) for name, module in model.named_modules()
            if getattr(module, '_cross_iteration_bn', False)]


def read_cbn_flags(model: nn.Module, warn: bool = True) -> Dict[str, dict]:
    """Read (and reset) the device-side event counters of every CBN layer.

    One host synchronization for the whole model. With ``warn``, each kind
    of event is logged once per layer and run, naming the layer.

    Returns:
        dict: Layer name -> {'dropped', 'skipped', 'not_stored'} counts
        since the last read (layers with no event are left out).
    """
    layers = [(n, l) for n, l in _layers(model) if l._flags is not None]
    if not layers:
        return {}
    values = _gather([l._flags for _, l in layers])
    out = {}
    for (name, layer), counts in zip(layers, values):
        layer._flags.zero_()
        # (plus the host's part of the counters, see the layer's _flag)
        counts = [n + base for n, base in zip(counts, layer._flag_base)]
        layer._flag_base = [0] * len(counts)
        if not any(counts):
            continue
        out[name] = dict(zip(('dropped', 'skipped', 'not_stored'), counts))
        if warn:
            for index, n in enumerate(counts):
                if n:
                    layer._warn_once(
                        f'flag{index}', f'{layer.cbn_name or name}: ' +
                        _FLAG_MESSAGES[index].format(n=n) +
                        ' (first seen by iteration '
                        f'{layer.iteration}; later events are counted '
                        'silently).')
    return out


def _gather(tensors: List[Tensor]) -> list:
    """Stack small device tensors and copy them to the host at once."""
    device = tensors[0].device
    return torch.stack([t.to(device) for t in tensors]).tolist()


def layer_group(name: str) -> str:
    """'backbone', 'neck' or 'head' by module path (else the first part)."""
    first = name.split('.', 1)[0]
    if first in ('backbone', 'neck'):
        return first
    if 'head' in first:
        return 'head'
    return first or 'model'


def _ratio(acc: List[float], metric: str) -> Optional[float]:
    total, count = METRICS[metric]
    return acc[total] / acc[count] if acc[count] else None


def read_cbn_health(model: nn.Module,
                    by_group: bool = False,
                    reset: bool = True) -> Dict[str, float]:
    """The health metrics of the monitored calls since the last read.

    One host synchronization for the whole model. Model-wide values pool
    the terms of every layer (each layer's calls weigh by their entries
    and channels). Binding counts come from the last training forward.

    Args:
        model (nn.Module): The model.
        by_group (bool): Also give each metric per layer group
            (``backbone``, ``neck``, ``head``), as ``'<metric>/<group>'``.
        reset (bool): Reset the accumulators.

    Returns:
        dict: Metric name -> value, plus ``bound``, ``frozen``,
        ``unbound`` layer counts (and, with ``compensate='upstream'``,
        ``upstream_followed``/``upstream_fallbacks``: feeding norms
        followed and paths that fell back, over all layers). Once a
        layer has been monitored, every metric is given: a metric with no
        term since the last read (no window entry was used: burn-in, an
        unbound layer, windows still empty) is 0.0, its value for
        BatchNorm. So a log has the same keys
        in every line, and a value is never left over from an earlier read.
    """
    layers = _layers(model)
    out: Dict[str, float] = {}
    for status in ('bound', 'frozen', 'unbound'):
        out[status] = 0
    for _, layer in layers:
        seen = [b for b in layer.bindings if b is not None]
        if seen:
            status = 'unbound' if any(b.status == 'unbound' for b in seen) \
                else ('frozen' if all(b.status == 'frozen' for b in seen)
                      else 'bound')
            out[status] += 1
    upstream = [b for _, layer in layers for b in layer.bindings
                if b is not None and b.upstream]
    if upstream:  # compensate='upstream': feeding norms followed / not
        out['upstream_followed'] = sum(b.upstream_followed
                                       for b in upstream)
        out['upstream_fallbacks'] = sum(b.upstream_fallbacks
                                        for b in upstream)
    monitored = [(n, l) for n, l in layers if l._health is not None]
    if not monitored:
        return out
    values = _gather([l._health for _, l in monitored])
    if reset:
        for _, layer in monitored:
            layer._health.zero_()
    totals = defaultdict(lambda: [0.0] * NUM_HEALTH)
    for (name, layer), acc in zip(monitored, values):
        layer._last_health = {m: _ratio(acc, m) for m in METRICS}
        keys = ['model'] + ([layer_group(name)] if by_group else [])
        for key in keys:
            totals[key] = [a + b for a, b in zip(totals[key], acc)]
    for key, acc in totals.items():
        for metric in METRICS:
            value = _ratio(acc, metric)
            out[metric if key == 'model' else f'{metric}/{key}'] = \
                0.0 if value is None else value
    return out


def health_warnings(model: nn.Module) -> List[str]:
    """Log, once per run and layer, what the last health read suggests
    (after burn-in only): many repairs, or compensation larger than the
    spread it corrects.

    Returns:
        list[str]: The messages logged now.
    """
    repaired: List[Tuple[str, float]] = []
    large: List[Tuple[str, float]] = []
    for name, layer in _layers(model):
        health = getattr(layer, '_last_health', None)
        if not health or layer.window_at(max(layer.iteration, 0)) == 1:
            continue
        if (health['repaired_frac'] or 0) > REPAIR_WARN and \
                'repairs' not in layer._warned:
            layer._warned.add('repairs')
            repaired.append((name, health['repaired_frac']))
        if (health['comp_mean'] or 0) > COMP_WARN and \
                'large-comp' not in layer._warned:
            layer._warned.add('large-comp')
            large.append((name, health['comp_mean']))
    messages = []
    if repaired:
        messages.append(
            'CBN: the compensated variance needed the max(nu, mu^2) repair '
            f'for more than {REPAIR_WARN:.0%} of the window entries after '
            'burn-in in ' + _list(repaired) + '. The weights move too fast '
            'for the Taylor estimate: a longer burnin or a smaller window '
            'should help.')
    if large:
        messages.append(
            'CBN: the mean compensation is larger than the batch standard '
            'deviation it corrects in ' + _list(large) + '. Compensation '
            'fights a fast-moving network there: consider a longer burnin, '
            'a smaller window or a lower learning rate.')
    for message in messages:
        print_log(message, logger='current', level=logging.WARNING)
    return messages


def _list(items: Iterable[Tuple[str, float]]) -> str:
    items = list(items)
    shown = ', '.join(f'{n} ({v:.2f})' for n, v in items[:5])
    more = len(items) - 5
    return shown + (f' and {more} more' if more > 0 else '')


def set_cbn_monitor(model: nn.Module, enabled: bool) -> None:
    """Ask the CBN layers to compute health metrics in their next training
    forwards (until disabled); :class:`mmcbn.CBNHook` does this for the
    iterations it logs."""
    for _, layer in _layers(model):
        layer._monitor = bool(enabled)
