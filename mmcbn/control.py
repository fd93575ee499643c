# Copyright (c) mmcbn contributors. All rights reserved.
"""Helpers to drive the CBN layers of a model from a training loop.

:class:`mmcbn.CBNHook` calls these for mmengine runners; custom loops call
them directly::

    for it, batch in enumerate(loader):
        set_cbn_iteration(model, it)
        loss = model(batch)
        ...
"""
from collections import Counter
from typing import Dict, Iterator, List, Optional, Tuple

from torch import Tensor, nn

from .cbn import CBN_LAYERS
from .health import read_cbn_flags


def cbn_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """Yield ``(name, layer)`` for every CBN layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, CBN_LAYERS):
            yield name, module


def name_cbn_layers(model: nn.Module) -> int:
    """Give every CBN layer its name in ``model`` (used in messages).

    Returns:
        int: The number of CBN layers.
    """
    count = 0
    for name, layer in cbn_layers(model):
        layer.cbn_name = name or type(layer).__name__
        count += 1
    return count


def set_cbn_iteration(model: nn.Module, iteration: int) -> None:
    """Tell every CBN layer of ``model`` that ``iteration`` begins.

    Call it before the forward of each training iteration (0-based, the
    same counter on resume). Calls of a layer until the next
    ``set_cbn_iteration`` count as call positions of one iteration.
    """
    for _, layer in cbn_layers(model):
        layer.start_iteration(iteration)


def set_cbn_accumulation(model: nn.Module,
                         cycle_length: int,
                         window_in_cycles: bool = False) -> None:
    """Tell every CBN layer that gradients accumulate over ``cycle_length``
    micro-batches (iterations) per optimizer step, counted from iteration
    0; see :meth:`mmcbn.CBN2d.set_accumulation`. :class:`mmcbn.CBNHook`
    calls it from the runner's ``accumulative_counts``."""
    for _, layer in cbn_layers(model):
        layer.set_accumulation(cycle_length, window_in_cycles)


def set_cbn_epoch_length(model: nn.Module, iters_per_epoch: int) -> None:
    """Set the epoch length used to convert ``burnin`` given in epochs."""
    if isinstance(iters_per_epoch, bool) or not isinstance(
            iters_per_epoch, int) or iters_per_epoch < 1:
        raise ValueError('iters_per_epoch must be an integer >= 1, got '
                         f'{iters_per_epoch!r}')
    for _, layer in cbn_layers(model):
        layer.iters_per_epoch = iters_per_epoch


def binding_report(model: nn.Module) -> Dict[str, List[str]]:
    """What each CBN layer was bound to in its last training forward.

    Reading the report is a natural point for a host synchronization, so
    it also reads the layers' device-side event counters and logs their
    warnings (:func:`mmcbn.read_cbn_flags`).

    Returns:
        dict: Layer name -> one entry per call position: the producing
        module's name (or its description) for a bound layer,
        ``'frozen: ...'``, ``'unbound: <reason>'``, or ``'not run'`` for a
        position never run in training mode.
    """
    read_cbn_flags(model)
    param_owner = {}
    for name, module in model.named_modules():
        weight = getattr(module, 'weight', None)
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and \
                isinstance(weight, nn.Parameter):
            param_owner[id(weight)] = name
    report = {}
    for name, layer in cbn_layers(model):
        entries = []
        for binding in layer.bindings or [None]:
            if binding is None:
                entries.append('not run')
            elif binding.status == 'unbound':
                entries.append(f'unbound: {binding.reason}')
            else:
                owner = param_owner.get(binding.weight_id,
                                        binding.description)
                prefix = 'frozen: ' if binding.status == 'frozen' else ''
                suffix = f' [upstream: {binding.upstream}]' if \
                    binding.upstream else ''
                entries.append(prefix + owner + suffix)
        report[name] = entries
    return report


def fallback_reason(entry: str) -> str:
    """The reason of one path not followed, without the layer's name:
    ``'backbone.layer3.0.bn3 (more than 4 feeding norms)'`` -> ``'more
    than 4 feeding norms'``; an autograd node's name stays as it is."""
    head, sep, tail = entry.partition(' (')
    if sep and tail.endswith(')') and ('.' in head or head.startswith(
            ('CBN', 'SyncCBN'))):
        return tail[:-1]
    return entry


def upstream_coverage(model: nn.Module) -> dict:
    """What the upstream compensation follows in ``model`` (after a
    training forward): the CBN layers asking for it, those whose producer
    is fed by at least one followed norm, the feeding norms followed, and
    the paths not followed counted by reason (host bookkeeping only).

    Returns:
        dict: ``layers``, ``fed``, ``followed``, ``fallbacks`` (reason ->
        count) and ``fallback_layers`` (reason -> layer names).
    """
    out = dict(layers=0, fed=0, followed=0, fallbacks=Counter(),
               fallback_layers={})
    for name, layer in cbn_layers(model):
        if getattr(layer, 'compensate', None) != 'upstream':
            continue
        seen = [b for b in layer.bindings if b is not None and
                b.status == 'bound']
        if not seen:
            continue
        out['layers'] += 1
        out['fed'] += any(b.upstream_followed for b in seen)
        for b in seen:
            out['followed'] += b.upstream_followed
            for entry in b.upstream_not_followed:
                reason = fallback_reason(entry)
                out['fallbacks'][reason] += 1
                names = out['fallback_layers'].setdefault(reason, [])
                if name not in names:
                    names.append(name)
    return out


def coverage_text(coverage: dict) -> str:
    """:func:`upstream_coverage` in one line."""
    text = (f'upstream: {coverage["followed"]} feeding norms followed '
            f'into {coverage["fed"]} of {coverage["layers"]} layers')
    if coverage['fallbacks']:
        parts = []
        for reason, n in coverage['fallbacks'].most_common():
            layers = coverage['fallback_layers'][reason]
            more = ', ...' if len(layers) > 3 else ''
            parts.append(f'{n} x {reason} ({", ".join(layers[:3])}{more})')
        text += '; not followed: ' + '; '.join(parts)
    else:
        text += '; no path falls back'
    return text


def binding_summary(model: nn.Module) -> str:
    """One line on how the CBN layers of ``model`` were bound."""
    status = Counter()
    kinds = Counter()
    fallbacks = []
    for name, layer in cbn_layers(model):
        seen = [b for b in layer.bindings if b is not None]
        if not seen and getattr(layer, '_compiled', False):
            status['ran as BatchNorm inside torch.compile'] += 1
            continue
        if not layer.training or not seen:
            status['not run in training mode'] += 1
            continue
        unbound = [b for b in seen if b.status == 'unbound']
        if unbound:
            status['fell back to BN'] += 1
            fallbacks.append(f'{name} ({unbound[0].reason})')
            continue
        frozen = all(b.status == 'frozen' for b in seen)
        status['frozen producer' if frozen else 'bound'] += 1
        for b in seen:
            kinds[b.description.split('(')[0]] += 1
    total = sum(status.values())
    parts = [f'{n} {what}' for what, n in status.items()]
    line = f'CBN: {total} layers: ' + ', '.join(parts)
    if kinds:
        line += ' | producers: ' + ', '.join(
            f'{k} x{n}' for k, n in sorted(kinds.items()))
    if fallbacks:
        line += ' | fell back: ' + '; '.join(fallbacks)
    coverage = upstream_coverage(model)
    if coverage['layers']:
        line += ' | ' + coverage_text(coverage)
    return line


def producer_parameters(model: nn.Module, binding) -> Tuple[Optional[Tensor],
                                                            Optional[Tensor]]:
    """The current (weight, bias) of the producer a binding names, looked up
    among ``model``'s parameters (None where absent or not a parameter)."""
    params = {id(p): p for p in model.parameters()}
    key = binding.key
    if key[0] not in ('conv', 'linear'):
        return None, None
    weight, bias = params.get(key[1]), params.get(key[3])
    return (None if weight is None else weight.detach(),
            None if bias is None else bias.detach())


def window_statistics(model: nn.Module,
                      layer: nn.Module,
                      position: int = 0,
                      iteration: Optional[int] = None,
                      lags: Optional[int] = None
                      ) -> Dict[int, Tuple[Tensor, Tensor, Tensor]]:
    """What ``layer`` would average from earlier iterations, compensated to
    the current parameters of ``model`` (for studies and tests; one host
    synchronization).

    Args:
        model (nn.Module): The model holding the layer and its producer.
        layer (nn.Module): A CBN layer of ``model``.
        position (int): The call position. Defaults to 0.
        iteration (int, optional): The iteration to assume; defaults to
            the one after the layer's last training forward.
        lags (int, optional): How far back to look; defaults to what the
            layer would use at ``iteration`` (0 in burn-in).

    Returns:
        dict: lag -> ``(mean, var, count)`` of every usable earlier entry
        inside the window (``var`` repaired, as the layer uses it).
    """
    binding = layer.bindings[position]
    if binding is None or binding.status == 'unbound':
        return {}
    t = layer.iteration + 1 if iteration is None else iteration
    weight = bias = None
    if layer.compensate and binding.status == 'bound':
        weight, bias = producer_parameters(model, binding)
        if weight is None and binding.key[-2]:
            raise ValueError(
                f'{layer._name()}: the producer weight is computed, not a '
                'parameter of the model; its window cannot be evaluated '
                'from the model alone')
    history = layer._windows[position].compensated(
        t, layer.history_lags(t) if lags is None else lags, binding.key,
        weight, bias,
        cycle=t // layer.cycle_length)
    if history is None:
        return {}
    counts = history.count.tolist()
    return {
        lag + 1: (history.mean[lag], history.var[lag].clamp(min=0),
                  history.count[lag])
        for lag, n in enumerate(counts) if n > 0
    }
