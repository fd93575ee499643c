# Copyright (c) mmcbn contributors. All rights reserved.
"""Turn a CBN training run into a model stock mmdet/mmseg can load.

A CBN layer in eval mode is BatchNorm with the same parameters and buffers,
so publishing needs no weight arithmetic: the config's norm types become
BN, mmcbn's imports and hooks go, and the checkpoint keeps ``meta`` and
``state_dict`` only, in types that torch's weights-only loader accepts
without any allow-list. MABN is BatchNorm with ``running_mean = 0`` in eval
mode (its moving-average buffers go), and a weight-centred convolution
(``ConvWC``) becomes a plain one holding its centred weight.
"""
import copy
import inspect
import numbers
from collections import OrderedDict
from typing import Any, Dict, FrozenSet, Optional, Tuple

import numpy as np
import torch
from mmengine.config import Config
from mmengine.registry import MODELS
from torch import nn

#: mmcv's synchronized BatchNorm types, exported as BN. CBN types are not
#: listed: :func:`norm_types_to_bn` finds them in the registry.
SYNC_BN_TO_BN = {'SyncBN': 'BN', 'MMSyncBN': 'BN'}
#: Keys of a norm config that are no arguments of the layer: mmcv's
#: ``build_norm_layer`` consumes ``type`` and ``requires_grad``, and
#: mmengine's config puts ``_scope_`` into the dicts of ``mmdet::``/
#: ``mmseg::`` base files that have a ``type`` (e.g. a top-level
#: ``norm_cfg`` variable).
BUILDER_KEYS = ('type', 'requires_grad', '_scope_')
#: BatchNorm base class -> the mmcv type that builds it.
_BN_TYPES = ((nn.BatchNorm1d, 'BN1d'), (nn.BatchNorm2d, 'BN'),
             (nn.BatchNorm3d, 'BN3d'))
#: Training-only wrappers of mmcbn replaced by mmengine's plain one.
OPTIM_WRAPPERS_TO_PLAIN = {'CPUAutocastOptimWrapper': 'OptimWrapper'}


def bn_type_of(cls: type) -> str:
    """The mmcv BN type (``'BN1d'``, ``'BN'``, ``'BN3d'``) of a layer class
    from its BatchNorm base class.

    Raises:
        TypeError: If ``cls`` subclasses none of ``nn.BatchNorm1d/2d/3d``.
    """
    for base, bn_type in _BN_TYPES:
        if issubclass(cls, base):
            return bn_type
    raise TypeError(
        f'{cls.__module__}.{cls.__qualname__} subclasses none of '
        'nn.BatchNorm1d/2d/3d: cannot export it as BatchNorm')


def _exports_as_bn(cls: Any) -> bool:
    """Whether ``cls`` is an mmcbn norm layer that publishes as BN."""
    from .cbn import _CrossIterationBatchNorm
    from .mabn import MABN2d
    return isinstance(cls, type) and issubclass(
        cls, (_CrossIterationBatchNorm, MABN2d))


def norm_types_to_bn() -> Dict[str, str]:
    """Norm types that publishing turns into BatchNorm, and their BN type.

    Every class in mmengine's root ``MODELS`` registry that has mmcbn's CBN
    behaviour (``mmcbn.cbn._CrossIterationBatchNorm``) or is MABN, under
    each name it is registered with, maps to the BN type of its BatchNorm
    base class;
    mmcv's ``SyncBN``/``MMSyncBN`` map to ``'BN'``. The registry is read at
    each call, so layers registered later are covered too.

    Returns:
        dict[str, str]: Registered name -> ``'BN1d'``, ``'BN'`` or ``'BN3d'``.
    """
    mapping = dict(SYNC_BN_TO_BN)
    for name, cls in MODELS.module_dict.items():
        if _exports_as_bn(cls):
            mapping[name] = bn_type_of(cls)
    return mapping


def conv_types_to_plain() -> Dict[str, str]:
    """Conv types that publishing turns into mmcv's plain ``'Conv2d'``:
    every name under which a weight-centred convolution
    (:class:`mmcbn.mabn.ConvWC`) is registered."""
    from .mabn import ConvWC
    return {name: 'Conv2d' for name, cls in MODELS.module_dict.items()
            if isinstance(cls, type) and issubclass(cls, ConvWC)}


def _init_keywords(cls: type) -> Optional[FrozenSet[str]]:
    """Names ``cls(...)`` accepts as keywords; None if it takes any
    (``**kwargs``)."""
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _registered(name: str) -> Optional[type]:
    """The class mmcv's ``build_norm_layer`` would build for ``name``."""
    import mmcv.cnn  # noqa: F401  (registers BN/BN1d/BN3d/SyncBN)
    cls = MODELS.get(name)
    return cls if isinstance(cls, type) else None


def convert_norm_cfg(cfg: Dict[str, Any], bn_type: str) -> Dict[str, Any]:
    """A CBN (or SyncBN) norm config as a ``bn_type`` config.

    Keeps :data:`BUILDER_KEYS` (``type`` becomes ``bn_type``) and the keys
    that the BN class's ``__init__`` accepts (``eps``, ``momentum``,
    ``affine``, ``track_running_stats``, ...); drops everything else: the
    options only the source layer takes (``window``, ``burnin``,
    ``running_stats_from``, ``process_group``, ... whatever its signature
    holds), so an option added later needs no change here.

    Args:
        cfg (dict): The norm config, ``type`` included.
        bn_type (str): ``'BN1d'``, ``'BN'`` or ``'BN3d'``.

    Returns:
        dict: The BN norm config.

    Raises:
        KeyError: If ``bn_type`` is not registered.
    """
    target = _registered(bn_type)
    if target is None:
        raise KeyError(f'norm type {bn_type!r} is not registered in '
                       "mmengine's MODELS (is mmcv installed?)")
    accepted = _init_keywords(target)
    return {
        key: bn_type if key == 'type' else value
        for key, value in cfg.items()
        if key in BUILDER_KEYS or accepted is None or key in accepted
    }


def _convert_norms(node: Any, to_bn: Dict[str, str],
                   to_plain: Dict[str, str]) -> Any:
    """Recursively replace CBN/SyncBN/MABN norm configs with BN ones and
    weight-centred conv configs with plain ones."""
    from .mabn import ConvWC
    if isinstance(node, dict):
        out = {k: _convert_norms(v, to_bn, to_plain)
               for k, v in node.items()}
        norm_type = out.get('type')
        bn_type = None
        if isinstance(norm_type, str):
            bn_type = to_bn.get(norm_type)
        elif _exports_as_bn(norm_type):
            bn_type = bn_type_of(norm_type)  # a class in a Python config
        if bn_type is not None:
            out = convert_norm_cfg(out, bn_type)
        elif (isinstance(norm_type, str) and norm_type in to_plain) or (
                isinstance(norm_type, type) and issubclass(norm_type,
                                                           ConvWC)):
            out['type'] = 'Conv2d'
        if out.get('init_cfg') is not None:
            out['init_cfg'] = None
        if out.get('pretrained') is not None:
            out['pretrained'] = None
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(_convert_norms(v, to_bn, to_plain) for v in node)
    return node


def export_config(cfg: Config) -> Config:
    """A standalone config of the same model with BN instead of CBN.

    Every CBN type registered in mmengine's ``MODELS`` (and mmcv's
    SyncBN/MMSyncBN) becomes the BN type of its BatchNorm base class with
    only the arguments BN accepts (see :func:`convert_norm_cfg`); ``mmcbn``
    leaves ``custom_imports`` and ``CBNHook`` leaves ``custom_hooks``;
    ``init_cfg``/``pretrained``/``load_from``/``resume`` are cleared (the
    published checkpoint holds all weights).

    Args:
        cfg (Config): The training config (``_base_`` files resolved).

    Returns:
        Config: The exported config.
    """
    data = _convert_norms(copy.deepcopy(cfg.to_dict()), norm_types_to_bn(),
                          conv_types_to_plain())
    imports = data.get('custom_imports')
    if imports:
        names = imports.get('imports', [])
        names = [names] if isinstance(names, str) else list(names)
        names = [n for n in names if n != 'mmcbn' and
                 not n.startswith('mmcbn.')]
        if names:
            data['custom_imports'] = dict(imports, imports=names)
        else:
            data.pop('custom_imports')
    hooks = [
        h for h in data.get('custom_hooks', []) or []
        if not (isinstance(h, dict) and h.get('type') == 'CBNHook')
    ]
    if 'custom_hooks' in data:
        data['custom_hooks'] = hooks
    wrapper = data.get('optim_wrapper')
    if isinstance(wrapper, dict) and wrapper.get(
            'type') in OPTIM_WRAPPERS_TO_PLAIN:
        wrapper['type'] = OPTIM_WRAPPERS_TO_PLAIN[wrapper['type']]
        wrapper.pop('dtype', None)
    data['load_from'] = None
    data['resume'] = False
    return Config(data)


def _plain(value: Any, where: str) -> Any:
    """``value`` with numpy types turned into Python ones.

    Raises:
        TypeError: For anything a weights-only loader would reject.
    """
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, numbers.Number) and isinstance(
            value, (int, float, complex)):
        return value
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        return {k: _plain(v, f'{where}.{k}') for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(
            _plain(v, f'{where}[{i}]') for i, v in enumerate(value))
    raise TypeError(f'cannot publish {where}: a {type(value).__name__} is '
                    'not loadable by torch.load(weights_only=True)')


def export_checkpoint(ckpt: Dict[str, Any],
                      exported_cfg: Config) -> Dict[str, Any]:
    """Keep ``meta`` and ``state_dict`` in weights-only-loadable types.

    Optimizer, message hub, schedulers and anything else are dropped; the
    training config in ``meta['cfg']`` is replaced with the exported one.
    The state is what the exported (BN, plain conv) model loads: see
    :func:`plain_state_dict`.

    Raises:
        KeyError: If the checkpoint has no ``state_dict``.
    """
    if 'state_dict' not in ckpt:
        raise KeyError(
            f'no state_dict in the checkpoint (keys: {sorted(ckpt)})')
    state = plain_state_dict(ckpt['state_dict'])
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f'state_dict entries are not tensors: {bad[:5]}')
    meta = dict(ckpt.get('meta') or {})
    meta['cfg'] = exported_cfg.pretty_text
    meta['exported_by'] = 'mmcbn.export (CBN -> BN)'
    return dict(meta=_plain(meta, 'meta'), state_dict=state)


def plain_state_dict(state: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of ``state`` for the exported model: MABN's moving-average
    buffers dropped (its BN buffers stay: ``running_mean`` is 0), and each
    weight-centred convolution's weight centred, its marker dropped."""
    from .mabn import MABN_ONLY_BUFFERS, centre_filters
    out = OrderedDict()
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().clone()
        name = key.rsplit('.', 1)[-1]
        if name in MABN_ONLY_BUFFERS:
            continue
        if name == 'weight_centred':
            weight = key[:-len(name)] + 'weight'
            if weight not in state:
                raise KeyError(f'{key} marks a weight-centred convolution, '
                               f'but the state has no {weight}')
            continue
        out[key] = value
    for key in state:
        if key.rsplit('.', 1)[-1] == 'weight_centred':
            weight = key[:-len('weight_centred')] + 'weight'
            out[weight] = centre_filters(out[weight])
    return out


def dropped_keys(ckpt: Dict[str, Any]) -> Tuple[str, ...]:
    """Top-level checkpoint keys that publishing drops."""
    return tuple(sorted(k for k in ckpt if k not in ('meta', 'state_dict')))
