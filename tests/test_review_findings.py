# Copyright (c) mmcbn contributors. All rights reserved.
"""Checks added after the review of issue 14.

Publishing (``tools/publish_model.py``) with every CBN option: the options
are read from the layers' signatures, so an option added later is exported
and tested without touching this file.
"""
import inspect
import os
import os.path as osp
import subprocess
import sys
from typing import Any, Dict

import pytest
import torch
from mmcv.cnn import build_norm_layer
from mmengine.config import Config
from torch import nn

import mmcbn
from mm_builders import (FASTER_RCNN, build, det_batch, faster_rcnn_cfg,
                         full_config, seg_batch)
from mmcbn import CBN2d
from mmcbn.cbn import _CrossIterationBatchNorm
from mmcbn.export import export_config

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TESTS = osp.join(ROOT, 'tests')
sys.path.insert(0, osp.join(ROOT, 'tools'))
import publish_model  # noqa: E402

# ------------------------------------------------------------------ options
#: Layer arguments that are not norm-config options.
NOT_OPTIONS = ('self', 'num_features', 'device', 'dtype')
#: Non-default values of the options known today, chosen so that a model
#: with all of them at once still trains (window > 1 after a burn-in of one
#: iteration) and exports. An option missing here gets one from its default
#: (see :func:`non_default`).
NON_DEFAULT = dict(
    eps=1e-3,
    momentum=None,
    affine=False,
    track_running_stats=False,
    window=2,
    burnin=1,
    burnin_by_epoch=True,
    compensate=False,
    running_stats_from='window',
    store_dtype='bfloat16')
#: BatchNorm class each exported type must build.
BN_CLASS = {'BN1d': nn.BatchNorm1d, 'BN': nn.BatchNorm2d, 'BN3d':
            nn.BatchNorm3d}


def cbn_options(cls: type = CBN2d) -> Dict[str, inspect.Parameter]:
    """The config options of a CBN layer class, from its signature and,
    where it forwards ``*args``/``**kwargs`` (SyncCBN), its bases'."""
    options = {}
    for klass in cls.__mro__:
        if '__init__' not in vars(klass):
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())
        for p in params:
            if p.name not in NOT_OPTIONS and p.kind in (
                    p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                options.setdefault(p.name, p)
        if not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                   for p in params):
            break
    return options


def non_default(name: str, param: inspect.Parameter) -> Any:
    """A value of option ``name`` other than its default where one can be
    derived; otherwise its default, written out (the key itself must still
    export)."""
    if name in NON_DEFAULT:
        return NON_DEFAULT[name]
    default = param.default
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return 2 * default if default else 0.5
    return default


def all_options(cls: type = CBN2d) -> Dict[str, Any]:
    return {n: non_default(n, p) for n, p in cbn_options(cls).items()}


def registered_cbn_types() -> Dict[str, type]:
    """Every name in mmengine's root MODELS whose class is a CBN layer."""
    from mmengine.registry import MODELS
    return {
        name: cls
        for name, cls in MODELS.module_dict.items()
        if isinstance(cls, type) and issubclass(cls, _CrossIterationBatchNorm)
    }


def bn_keys(cfg: Dict[str, Any], bn_cls: type = nn.BatchNorm2d) -> Dict:
    """What a BN config made from ``cfg`` must hold."""
    accepted = inspect.signature(bn_cls).parameters
    return {k: v for k, v in cfg.items() if k in accepted}


def test_every_known_option_is_a_real_argument():
    """NON_DEFAULT names real options (a renamed option is noticed), and
    each of its values differs from the default."""
    options = cbn_options()
    assert set(NON_DEFAULT) <= set(options), set(NON_DEFAULT) - set(options)
    for name, value in NON_DEFAULT.items():
        assert value != options[name].default, name


@pytest.mark.parametrize('name', sorted(registered_cbn_types()))
def test_every_registered_cbn_type_exports_with_all_options(name):
    """Each registered CBN type (SyncCBN too, once it exists) becomes the BN
    of its BatchNorm base class; every option of its signature goes or
    stays as BN's signature says; mmcv builds plain BN from it, and the CBN
    layer's state dict loads into that strictly."""
    cls = registered_cbn_types()[name]
    options = all_options(cls)
    cfg = dict(type=name, requires_grad=True, **options)
    out = export_config(Config(dict(model=dict(norm_cfg=cfg)))).model
    bn_types = [t for t, bn in BN_CLASS.items() if issubclass(cls, bn)]
    assert len(bn_types) == 1, (name, cls.__mro__)
    bn_type = bn_types[0]
    assert out.norm_cfg == dict(type=bn_type, requires_grad=True,
                                **bn_keys(options, BN_CLASS[bn_type]))
    _, source = build_norm_layer(cfg, 6)
    _, layer = build_norm_layer(dict(out.norm_cfg), 6)
    assert type(layer) is BN_CLASS[bn_type]
    layer.load_state_dict(source.state_dict())  # strict


def test_sync_bn_keys_go_and_builder_keys_stay():
    out = export_config(
        Config(dict(norm_cfg=dict(type='SyncBN', process_group=None,
                                  momentum=0.3))))
    assert out.norm_cfg == dict(type='BN', momentum=0.3)
    # mmengine's _scope_ (top-level norm_cfg of an mmseg:: base) stays
    out = export_config(
        Config(dict(norm_cfg=dict(type='CBN', _scope_='mmseg', window=4,
                                  requires_grad=True))))
    assert out.norm_cfg == dict(type='BN', _scope_='mmseg',
                                requires_grad=True)


def test_a_cbn_layer_registered_later_exports_too():
    """A CBN subclass with options of its own (as SyncCBN will have),
    registered after mmcbn's import, is found in the registry and exported
    by its BatchNorm base, its own options dropped."""
    from mmengine.registry import MODELS

    class FutureCBN3d(mmcbn.CBN3d):

        def __init__(self, num_features, *args, process_group=None,
                     fast_compensation=False, **kwargs):
            super().__init__(num_features, *args, **kwargs)
            self.process_group = process_group
            self.fast_compensation = fast_compensation

    MODELS.register_module('FutureCBN3d', module=FutureCBN3d)
    try:
        cfg = dict(type='FutureCBN3d', window=2, process_group=None,
                   fast_compensation=True, momentum=0.2)
        out = export_config(Config(dict(norm_cfg=cfg))).norm_cfg
        assert out == dict(type='BN3d', momentum=0.2)
        _, layer = build_norm_layer(dict(out), 4)
        assert type(layer) is nn.BatchNorm3d
    finally:
        MODELS._module_dict.pop('FutureCBN3d')


CBN_CONFIGS = sorted(
    osp.relpath(osp.join(d, f), ROOT)
    for d, _, fs in os.walk(osp.join(ROOT, 'configs')) for f in fs
    if f.endswith('.py') and 'cbn' in f and '_base_' not in d)  # + synccbn


@pytest.mark.parametrize('rel', CBN_CONFIGS)
def test_every_cbn_config_of_the_repo_exports(rel):
    """The shipped CBN configs (with mmdet::/mmseg:: bases, whose dicts
    carry mmengine's ``_scope_``) export to configs whose model norm
    configs mmcv builds as plain BatchNorm."""
    out = export_config(Config.fromfile(osp.join(ROOT, rel)))
    assert 'CBN' not in out.pretty_text
    found = norm_cfgs(out.to_dict()['model'])
    assert found, rel
    for path, cfg in found.items():
        _, layer = build_norm_layer(cfg, 8)
        assert type(layer) in (nn.BatchNorm2d, nn.GroupNorm), (path, cfg)


# ------------------------------------------- through tools/publish_model.py
def seg_config(norm_cfg: Dict[str, Any]) -> Config:
    """The demo FCN (half-width ResNetV1c-18) with ``norm_cfg`` in every
    part, 19 classes (the labels of ``mm_batches.seg_batch``), 64 px."""
    cfg = Config.fromfile(
        osp.join(ROOT, 'configs', 'demo', 'fcn_r18-d8_cbn_demo.py'))
    cfg.norm_cfg = norm_cfg
    model = cfg.model
    model.data_preprocessor.size = (64, 64)
    model.backbone.norm_cfg = norm_cfg
    for head in (model.decode_head, model.auxiliary_head):
        head.update(norm_cfg=norm_cfg, num_classes=19)
    return cfg


KINDS = {
    'det': ('mmdet', lambda norm: full_config(FASTER_RCNN,
                                              faster_rcnn_cfg(norm)),
            det_batch),
    'seg': ('mmseg', seg_config, seg_batch),
}


def outputs_of(kind, results):
    if kind == 'det':
        return [(r.pred_instances.bboxes, r.pred_instances.scores)
                for r in results]
    return [r.seg_logits.data for r in results]


def norm_cfgs(node, path=''):
    """Every ``norm_cfg`` dict in a config tree, by its path."""
    found = {}
    if isinstance(node, dict):
        for key, value in node.items():
            if key == 'norm_cfg' and isinstance(value, dict):
                found[f'{path}.{key}'] = dict(value)
            found.update(norm_cfgs(value, f'{path}.{key}'))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            found.update(norm_cfgs(value, f'{path}[{i}]'))
    return found


def train_and_publish(kind, options, tmp, steps=3, norm_type='CBN'):
    """Train a CBN model with ``options`` for ``steps`` iterations, save a
    checkpoint, publish it; returns the exported files and the CBN model's
    eval outputs."""
    from mm_builders import train_steps
    scope, make_cfg, make_batch = KINDS[kind]
    norm_cfg = dict(type=norm_type, **options)
    cfg = make_cfg(norm_cfg)
    config = str(tmp / f'{kind}_cbn.py')
    cfg.dump(config)
    model = build(scope, cfg.model)
    mmcbn.set_cbn_epoch_length(model, 1)  # for burnin_by_epoch=True
    train_steps(model, make_batch, steps)
    layers = [m for m in model.modules()
              if isinstance(m, _CrossIterationBatchNorm) and m.training]
    assert layers and all(m.iteration == steps - 1 for m in layers)
    ckpt = str(tmp / f'iter_{steps}.pth')
    torch.save(dict(meta=dict(iter=steps), state_dict=model.state_dict()),
               ckpt)
    model.eval()
    with torch.no_grad():
        expected = outputs_of(kind, model.test_step(make_batch(7)))
    out_dir = tmp / 'zoo'
    assert publish_model.main([ckpt, str(out_dir), '--config', config]) == 0
    files = sorted(os.listdir(out_dir))
    cfg_path = [str(out_dir / f) for f in files if f.endswith('.py')]
    ckpt_path = [str(out_dir / f) for f in files if f.endswith('.pth')]
    assert len(cfg_path) == 1 and len(ckpt_path) == 1, files
    # every norm config: BN with the options BN takes (and mmcv's
    # requires_grad where the base config had it), nothing else
    trained = norm_cfgs(cfg.to_dict())
    exported = norm_cfgs(Config.fromfile(cfg_path[0]).to_dict())
    assert set(exported) == set(trained) and len(trained) >= 3
    for path, before in trained.items():
        assert before == dict(before, **norm_cfg), path  # options all set
        extra = {k: before[k] for k in ('requires_grad', ) if k in before}
        assert exported[path] == dict(type='BN', **bn_keys(options),
                                      **extra), path
    return scope, cfg_path[0], ckpt_path[0], expected


@pytest.mark.parametrize('kind', sorted(KINDS))
def test_publish_with_every_option_non_default(kind, tmp_path):
    """The core check: every CBN option at once, away from its default,
    exports; stock mmdet/mmseg in a process where ``import mmcbn`` fails
    build the published config, load the checkpoint strictly and give the
    CBN model's eval outputs."""
    options = all_options()
    _, cfg_path, ckpt_path, expected = train_and_publish(
        kind, options, tmp_path)
    out = str(tmp_path / 'stock_outputs.pt')
    proc = subprocess.run(
        [sys.executable, osp.join(TESTS, 'stock_inference.py'), cfg_path,
         ckpt_path, kind, out],
        cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=TESTS),
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(out), expected, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize('option', sorted(cbn_options()))
def test_publish_with_each_option_non_default(option, tmp_path):
    """One option away from its default at a time (so each one's effect on
    training and on the exported BN shows alone): publishing succeeds, the
    exported model holds no CBN layer and reproduces the CBN model's eval
    outputs with the published weights."""
    options = {option: non_default(option, cbn_options()[option])}
    scope, cfg_path, ckpt_path, expected = train_and_publish(
        'seg', options, tmp_path)
    exported = build(scope, Config.fromfile(cfg_path).model)
    assert not any(isinstance(m, _CrossIterationBatchNorm)
                   for m in exported.modules())
    exported.load_state_dict(torch.load(ckpt_path)['state_dict'])  # strict
    exported.eval()
    with torch.no_grad():
        got = outputs_of('seg', exported.test_step(seg_batch(7)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_publish_a_synccbn_checkpoint(tmp_path):
    """A SyncCBN run (here trained in one process, where it is CBN)
    publishes to plain BN that reproduces its eval outputs."""
    options = dict(window=3, burnin=1)
    scope, cfg_path, ckpt_path, expected = train_and_publish(
        'seg', options, tmp_path, norm_type='SyncCBN')
    text = open(cfg_path).read()
    assert 'SyncCBN' not in text and "type='BN'" in text
    exported = build(scope, Config.fromfile(cfg_path).model)
    exported.load_state_dict(torch.load(ckpt_path)['state_dict'])  # strict
    exported.eval()
    with torch.no_grad():
        got = outputs_of('seg', exported.test_step(seg_batch(7)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
