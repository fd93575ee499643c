# Copyright (c) mmcbn contributors. All rights reserved.
"""Turn a CBN training run into a model stock mmdet/mmseg can load.

A CBN layer in eval mode is BatchNorm with the same parameters and buffers,
so publishing needs no weight arithmetic: the config's norm types become
BN, mmcbn's imports and hooks go, and the checkpoint keeps ``meta`` and
``state_dict`` only, in types that torch's weights-only loader accepts
without any allow-list.
"""
import copy
import numbers
from collections import OrderedDict
from typing import Any, Dict, Tuple

import numpy as np
import torch
from mmengine.config import Config

#: Norm types that become their BatchNorm counterpart.
NORM_TO_BN = {
    'CBN': 'BN',
    'CBN2d': 'BN',
    'CBN1d': 'BN1d',
    'CBN3d': 'BN3d',
    'SyncBN': 'BN',
    'MMSyncBN': 'BN',
}
#: Arguments only CBN takes.
CBN_ONLY_KEYS = ('window', 'burnin', 'burnin_by_epoch', 'compensate')
#: Training-only wrappers of mmcbn replaced by mmengine's plain one.
OPTIM_WRAPPERS_TO_PLAIN = {'CPUAutocastOptimWrapper': 'OptimWrapper'}


def _convert_norms(node: Any) -> Any:
    """Recursively replace CBN/SyncBN norm configs with BN ones."""
    if isinstance(node, dict):
        out = {k: _convert_norms(v) for k, v in node.items()}
        norm_type = out.get('type')
        if isinstance(norm_type, str) and norm_type in NORM_TO_BN:
            out['type'] = NORM_TO_BN[norm_type]
            for key in CBN_ONLY_KEYS:
                out.pop(key, None)
        if out.get('init_cfg') is not None:
            out['init_cfg'] = None
        if out.get('pretrained') is not None:
            out['pretrained'] = None
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(_convert_norms(v) for v in node)
    return node


def export_config(cfg: Config) -> Config:
    """A standalone config of the same model with BN instead of CBN.

    Every CBN (and SyncBN/MMSyncBN) becomes BN, CBN-only arguments are
    dropped, ``mmcbn`` leaves ``custom_imports`` and ``CBNHook`` leaves
    ``custom_hooks``, ``init_cfg``/``pretrained``/``load_from``/``resume``
    are cleared (the published checkpoint holds all weights).

    Args:
        cfg (Config): The training config (``_base_`` files resolved).

    Returns:
        Config: The exported config.
    """
    data = _convert_norms(copy.deepcopy(cfg.to_dict()))
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

    Raises:
        KeyError: If the checkpoint has no ``state_dict``.
    """
    if 'state_dict' not in ckpt:
        raise KeyError(
            f'no state_dict in the checkpoint (keys: {sorted(ckpt)})')
    state = OrderedDict((k, v.detach().clone() if isinstance(
        v, torch.Tensor) else v) for k, v in ckpt['state_dict'].items())
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f'state_dict entries are not tensors: {bad[:5]}')
    meta = dict(ckpt.get('meta') or {})
    meta['cfg'] = exported_cfg.pretty_text
    meta['exported_by'] = 'mmcbn.export (CBN -> BN)'
    return dict(meta=_plain(meta, 'meta'), state_dict=state)


def dropped_keys(ckpt: Dict[str, Any]) -> Tuple[str, ...]:
    """Top-level checkpoint keys that publishing drops."""
    return tuple(sorted(k for k in ckpt if k not in ('meta', 'state_dict')))
