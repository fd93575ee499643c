# Copyright (c) mmcbn contributors. All rights reserved.
"""The window state of a model's CBN layers, for exact resume.

A CBN layer keeps, per call position, the records of its last
``window - 1`` iterations. :func:`collect_window_state` turns them into
plain tensors and Python values that survive a new process: a producer is
named by its parameters' names in the model (not by ``id``), tensors are
on the CPU. :func:`restore_window_state` checks the state against the
model, names the first mismatch, and restores it. The model's
``state_dict`` is untouched, so a checkpoint still loads into plain BN
models; :class:`mmcbn.CBNHook` puts the state beside it, under
``checkpoint['cbn_windows']``.
"""
from typing import Any, Dict, List, Optional

from torch import nn

from .control import cbn_layers

#: Format version of the saved window state.
VERSION = 1
#: Positions of parameter ids in a producer key (weight, bias).
_ID_FIELDS = (1, 3)


class WindowStateMismatch(ValueError):
    """Saved window state that does not fit the model."""


def _portable_key(key: Optional[tuple], names: Dict[int, str]) -> Any:
    """A producer key with parameter ids replaced by parameter names."""
    if key is None or key[0] not in ('conv', 'linear'):
        return key
    out = list(key)
    for index in _ID_FIELDS:
        if out[index] is not None:
            if out[index] not in names:
                return None  # not a parameter of this model: not portable
            out[index] = names[out[index]]
    return tuple(out)


def _local_key(key: Any, params: Dict[str, nn.Parameter]) -> Any:
    if key is None or key[0] not in ('conv', 'linear'):
        return key
    out = list(key)
    for index in _ID_FIELDS:
        if out[index] is not None:
            out[index] = id(params[out[index]])
    return tuple(out)


def _portable_feed(feed: Optional[tuple], names: Dict[int, str]) -> Any:
    """The feeding norms of an upstream-compensated window, with the
    layers' ids replaced by their names (``False``: not portable)."""
    if feed is None:
        return None
    if any(f[1] not in names for f in feed):
        return False
    return tuple((f[0], names[f[1]]) + tuple(f[2:]) for f in feed)


def _local_feed(feed: Any, modules: Dict[str, nn.Module]) -> Any:
    if feed is None:
        return None
    return tuple((f[0], id(modules[f[1]])) + tuple(f[2:]) for f in feed)


def collect_window_state(model: nn.Module) -> Dict[str, Any]:
    """The window state of every CBN layer of ``model`` (CPU tensors).

    Returns:
        dict: ``{'version', 'layers': {name: {...}}}``; a layer holds its
        settings, iteration and one entry per call position.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    module_names = {id(m): n for n, m in model.named_modules()}
    layers = {}
    for name, layer in cbn_layers(model):
        positions: List[Optional[dict]] = []
        for state in layer._windows:
            saved = state.state_dict()
            saved['key'] = _portable_key(saved['key'], names)
            saved['feed'] = _portable_feed(saved.get('feed'), module_names)
            portable = (saved['key'] is not None or state.key is None) and \
                saved['feed'] is not False
            positions.append(saved if portable else None)
        layers[name] = dict(
            type=type(layer).__name__,
            num_features=layer.num_features,
            window=layer.window,
            compensate=layer.compensate,
            store_dtype=layer.store_dtype,
            capacity=layer.capacity,
            iteration=layer.iteration,
            external_iteration=layer._external_iteration,
            positions=positions)
    return dict(version=VERSION, layers=layers)


def _check(model: nn.Module, state: Dict[str, Any]) -> None:
    """Raise :class:`WindowStateMismatch` naming the first mismatch."""
    if not isinstance(state, dict) or state.get('version') != VERSION:
        raise WindowStateMismatch(
            f'unknown window-state format (version '
            f'{state.get("version") if isinstance(state, dict) else None!r},'
            f' expected {VERSION})')
    saved = state['layers']
    layers = dict(cbn_layers(model))
    for name in layers:
        if name not in saved:
            raise WindowStateMismatch(
                f'the model has CBN layer {name!r}, the checkpoint has no '
                'window state for it')
    for name in saved:
        if name not in layers:
            raise WindowStateMismatch(
                f'the checkpoint has window state for {name!r}, which is '
                'not a CBN layer of the model')
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for name, layer in layers.items():
        entry = saved[name]
        for field in ('num_features', 'window', 'compensate', 'store_dtype',
                      'capacity'):
            ours = getattr(layer, field)
            if entry[field] != ours:
                raise WindowStateMismatch(
                    f'layer {name!r} has {field}={entry[field]!r} in the '
                    f'checkpoint and {field}={ours!r} in the model')
        for position, pos_state in enumerate(entry['positions']):
            if pos_state is None or pos_state['key'] is None:
                continue
            for feed in pos_state.get('feed') or ():
                if feed[1] not in modules:
                    raise WindowStateMismatch(
                        f'layer {name!r} (call {position}) was fed by norm '
                        f'layer {feed[1]!r}, which the model does not have')
            key = pos_state['key']
            for index in _ID_FIELDS:
                pname = key[index]
                if pname is not None and pname not in params:
                    raise WindowStateMismatch(
                        f'layer {name!r} (call {position}) was fed by '
                        f'parameter {pname!r}, which the model does not have')
            weight = key[1]
            if weight is not None and tuple(
                    params[weight].shape) != tuple(key[2]):
                raise WindowStateMismatch(
                    f'layer {name!r} (call {position}) was fed by '
                    f'{weight!r} of shape {tuple(key[2])}; in the model it '
                    f'has shape {tuple(params[weight].shape)}')
            buffers = pos_state['buffers']
            if 'a_mean' in buffers and buffers['a_mean'].shape[1:] != (
                    layer.num_features, ):
                raise WindowStateMismatch(
                    f'layer {name!r} (call {position}) holds statistics of '
                    f'{buffers["a_mean"].shape[1]} channels, the model '
                    f'{layer.num_features}')


def check_window_state(model: nn.Module, state: Dict[str, Any]) -> None:
    """Check what :func:`collect_window_state` returned against ``model``
    without changing anything.

    Raises:
        WindowStateMismatch: Naming the first mismatch.
    """
    _check(model, state)


def restore_window_state(model: nn.Module, state: Dict[str, Any]) -> int:
    """Restore what :func:`collect_window_state` returned.

    Raises:
        WindowStateMismatch: If the state does not fit the model (another
            config, another window, another set of layers): nothing is
            changed then, and the message names the first mismatch.

    Returns:
        int: The number of call positions restored.
    """
    _check(model, state)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    restored = 0
    for name, layer in cbn_layers(model):
        entry = state['layers'][name]
        device = layer.running_mean.device if layer.running_mean is not \
            None else layer.weight.device if layer.weight is not None \
            else None
        layer._windows.clear()
        layer.bindings.clear()
        for pos_state in entry['positions']:
            layer._add_position()
            window = layer._windows[-1]
            if pos_state is None:
                continue
            pos_state = dict(pos_state)
            pos_state['key'] = _local_key(pos_state['key'], params)
            pos_state['feed'] = _local_feed(pos_state.get('feed'), modules)
            window.load_state_dict(pos_state, device)
            restored += 1
        layer._iteration = int(entry['iteration'])
        layer._external_iteration = bool(entry['external_iteration'])
    return restored
