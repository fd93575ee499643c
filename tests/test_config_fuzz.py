# Copyright (c) mmcbn contributors. All rights reserved.
"""Config fuzz: every CBN, SyncCBN and CBNHook option, given a wrong type
or value, is one clear error naming the key and the bad value, whichever
way the object is built (the class, mmcv's ``build_norm_layer``, mmengine's
``MODELS``/``HOOKS`` registries, a runner config); every valid value
builds, and a CBN layer built from valid options trains (issue 11, "Config
fuzz").
"""
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mmcv.cnn import build_norm_layer
from mmengine.registry import HOOKS, MODELS
from mmengine.runner import Runner
from torch import nn

from mmcbn import (CBN1d, CBN2d, CBN3d, CBNHook, SyncCBN1d, SyncCBN2d,
                   SyncCBN3d)
from tiny_cbn import tiny_config

#: Twice the profile's examples (tests/conftest.py): these are cheap.
FUZZ = settings(max_examples=2 * settings.default.max_examples)

CLASSES = (CBN1d, CBN2d, CBN3d, SyncCBN1d, SyncCBN2d, SyncCBN3d)
NAN, INF = float('nan'), float('inf')


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(
        value, bool) and math.isfinite(value)


def is_int(value, minimum):
    return isinstance(value, int) and not isinstance(
        value, bool) and value >= minimum


#: The documented domain of every CBN option (the oracle of the fuzz).
CBN_VALID = {
    'window': lambda v, cfg: is_int(v, 1),
    'burnin': lambda v, cfg: (is_number(v) and v >= 0) if cfg.get(
        'burnin_by_epoch') is True else is_int(v, 0),
    'burnin_by_epoch': lambda v, cfg: isinstance(v, bool),
    'compensate': lambda v, cfg: isinstance(v, bool) or v == 'upstream',
    'running_stats_from': lambda v, cfg: v is None or (
        isinstance(v, str) and v in ('batch', 'window')),
    'eps': lambda v, cfg: is_number(v) and v > 0,
    'momentum': lambda v, cfg: v is None or (is_number(v) and 0 <= v <= 1),
    'affine': lambda v, cfg: isinstance(v, bool),
    'track_running_stats': lambda v, cfg: isinstance(v, bool),
    'moment_stride': lambda v, cfg: is_int(v, 1),
    'store_dtype': lambda v, cfg: v is None or (isinstance(v, str) and v in (
        'bfloat16', 'float16')),
}

#: Wrong types and values for every CBN option.
CBN_BAD = {
    'window': [0, -3, 2.5, 4.0, True, '4', None, [4], NAN],
    'burnin': [-1, 1.5, '3', None, True, [0], NAN, INF],
    'burnin_by_epoch': [1, 0, 'yes', None, 1.0, [True]],
    'compensate': [1, 'no', None, 0.0, 'Upstream', ['upstream']],
    'running_stats_from': ['windows', 'Batch', 1, ['batch'],
                           ('batch', )],
    'eps': [0, 0.0, -1e-5, '1e-5', None, True, NAN, INF, [1e-5]],
    'momentum': [-0.1, 1.5, '0.1', True, NAN, INF, [0.1]],
    'affine': [1, 0, 'True', None],
    'track_running_stats': [1, 'yes', None, 0.0],
    'moment_stride': [0, -1, 2.0, True, '2', None, [2]],
    'store_dtype': ['bf16', 'float32', torch.bfloat16, 16, True, ['float16'],
                    {'dtype': 'float16'}],
}

#: Valid values at the edges of the domains.
CBN_GOOD = {
    'window': [1, 2, 16],
    'burnin': [0, 7],
    'burnin_by_epoch': [False, True],
    'compensate': [True, False, 'upstream'],
    'running_stats_from': [None, 'batch', 'window'],
    'eps': [1e-3, 1, 1e-12],
    'momentum': [None, 0, 1, 0.5],
    'affine': [True, False],
    'track_running_stats': [True, False],
    'moment_stride': [1, 2, 5],
    'store_dtype': [None, 'bfloat16', 'float16'],
}

HOOK_BOOLS = ('log_bindings', 'health', 'health_by_group', 'save_window',
              'resume_window', 'atomic_checkpoints')
HOOK_VALID = {
    **{key: lambda v: isinstance(v, bool)
       for key in HOOK_BOOLS},
    'interval': lambda v: v is None or is_int(v, 1),
    'window_unit': lambda v: isinstance(v, str) and v in ('iteration',
                                                          'cycle'),
    'text_log': lambda v: isinstance(v, str) and v in ('summary', 'full',
                                                       'none'),
}
HOOK_BAD = {
    **{key: [1, 0, 'yes', None, 1.0]
       for key in HOOK_BOOLS},
    'interval': [0, -5, 2.5, '10', True, [10], NAN],
    'window_unit': ['iterations', 'epoch', None, 1, ['cycle']],
    'text_log': ['Summary', 'per_group', None, True, ['full'], NAN],
}


def assert_names(err, key, value, prefix='CBN'):
    """One line naming the key and the bad value."""
    message = str(err.value)
    assert '\n' not in message, message
    assert re.search(rf'{prefix} {key} (\(epochs\) )?must be', message), (
        key, message)
    assert repr(value) in message, (key, value, message)


def spec(key, value):
    cfg = {key: value}
    if key == 'burnin' and not is_int(value, 0):
        cfg['burnin_by_epoch'] = False
    return cfg


# ------------------------------------------------------------ CBN, tables
@pytest.mark.parametrize('key,value', [(k, v) for k, vs in CBN_BAD.items()
                                       for v in vs])
def test_bad_cbn_option_names_key_and_value(key, value):
    cfg = spec(key, value)
    assert not CBN_VALID[key](value, cfg)
    for cls in CLASSES:
        with pytest.raises(ValueError) as err:
            cls(4, **cfg)
        assert_names(err, key, value)
    # mmcv's builder (what norm_cfg goes through) and the registry
    with pytest.raises(ValueError) as err:
        build_norm_layer(dict(type='CBN', **cfg), 4)
    assert_names(err, key, value)
    with pytest.raises(ValueError) as err:
        MODELS.build(dict(type='SyncCBN', num_features=4, **cfg))
    assert_names(err, key, value)


def test_burnin_in_epochs_is_a_number():
    for value in (-0.5, '2', None, True, NAN, INF, [1]):
        with pytest.raises(ValueError) as err:
            build_norm_layer(
                dict(type='CBN', burnin=value, burnin_by_epoch=True), 4)
        assert_names(err, 'burnin', value)
    _, layer = build_norm_layer(
        dict(type='CBN', burnin=2.5, burnin_by_epoch=True), 4)
    assert layer.burnin == 2.5


@pytest.mark.parametrize('key,value', [(k, v) for k, vs in CBN_GOOD.items()
                                       for v in vs])
def test_valid_cbn_option_builds_and_trains(key, value):
    """Every valid value builds through mmcv's builder, keeps its value,
    and the layer trains (finite outputs and statistics)."""
    cfg = {key: value}
    _, layer = build_norm_layer(dict(type='CBN', **cfg), 6)
    got = {'eps': layer.eps, 'momentum': layer.momentum,
           'affine': layer.affine,
           'track_running_stats': layer.track_running_stats}.get(
               key, getattr(layer, key, None))
    # (None resolves: 'window' with compensate='upstream', else 'batch')
    assert got == ('batch' if key == 'running_stats_from' and value is None
                   else value)
    if layer.burnin_by_epoch:
        layer.iters_per_epoch = 2
    conv = nn.Conv2d(3, 6, 3, padding=1)
    opt = torch.optim.SGD(list(conv.parameters()) + list(layer.parameters()),
                          lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        y = layer(conv(torch.randn(2, 3, 5, 5, generator=gen)))
        assert torch.isfinite(y).all()
        opt.zero_grad()
        (y**2).mean().backward()
        opt.step()
    if layer.track_running_stats:
        assert torch.isfinite(layer.running_var).all()
        assert int(layer.num_batches_tracked) == 4
    else:
        assert layer.running_var is None
    assert (layer.weight is None) == (not layer.affine)


@pytest.mark.parametrize('value', ['world', 0, [0, 1], dict(ranks=[0])])
def test_bad_process_group_names_key_and_value(value):
    for cls in (SyncCBN1d, SyncCBN2d, SyncCBN3d):
        with pytest.raises(ValueError) as err:
            cls(4, process_group=value)
        assert_names(err, 'process_group', value, prefix='SyncCBN')
    with pytest.raises(ValueError) as err:
        build_norm_layer(dict(type='SyncCBN', process_group=value), 4)
    assert_names(err, 'process_group', value, prefix='SyncCBN')
    assert SyncCBN2d(4, process_group=None).process_group is None


@pytest.mark.parametrize('cfg,key', [
    (dict(type='CBN', windw=4), 'windw'),
    (dict(type='SyncCBN', burn_in=3), 'burn_in'),
    (dict(type='CBN', process_group=None), 'process_group'),  # SyncCBN's
])
def test_unknown_cbn_key_is_rejected_by_name(cfg, key):
    with pytest.raises(TypeError, match=key):
        build_norm_layer(cfg, 4)


# ------------------------------------------------------------- CBN, fuzzed
ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(['batch', 'window', 'Batch', '', '4', 'True', 'bfloat16',
                     'float16', 'float32', 'iteration', 'cycle']),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(['a', 'b']), st.integers(), max_size=1))


@FUZZ
@given(key=st.sampled_from(sorted(CBN_VALID)), value=ANY,
       by_epoch=st.booleans(), cls=st.sampled_from(CLASSES))
def test_fuzz_one_cbn_option(key, value, by_epoch, cls):
    cfg = {key: value}
    if key == 'burnin':
        cfg['burnin_by_epoch'] = by_epoch
    if CBN_VALID[key](value, cfg):
        layer = cls(4, **cfg)
        assert isinstance(layer, nn.modules.batchnorm._BatchNorm)
    else:
        with pytest.raises(ValueError) as err:
            cls(4, **cfg)
        assert_names(err, key, value)


@FUZZ
@given(cfg=st.dictionaries(st.sampled_from(sorted(CBN_VALID)), ANY,
                           min_size=2, max_size=5))
def test_fuzz_whole_norm_cfg(cfg):
    """A whole norm_cfg with several keys: it builds if all values are
    valid; otherwise one error names one of the bad keys and its value."""
    bad = {k for k, v in cfg.items() if not CBN_VALID[k](v, cfg)}
    if not bad:
        _, layer = build_norm_layer(dict(type='CBN', **cfg), 4)
        assert isinstance(layer, CBN2d)
        return
    with pytest.raises(ValueError) as err:
        build_norm_layer(dict(type='CBN', **cfg), 4)
    named = re.search(r'CBN (\w+) (\(epochs\) )?must be', str(err.value))
    assert named and named.group(1) in bad, (bad, str(err.value))
    assert repr(cfg[named.group(1)]) in str(err.value)


# ------------------------------------------------------------------ CBNHook
@pytest.mark.parametrize('key,value', [(k, v) for k, vs in HOOK_BAD.items()
                                       for v in vs])
def test_bad_hook_option_names_key_and_value(key, value):
    assert not HOOK_VALID[key](value)
    with pytest.raises(ValueError) as err:
        CBNHook(**{key: value})
    assert_names(err, key, value, prefix='CBNHook')
    with pytest.raises(ValueError) as err:
        HOOKS.build(dict(type='CBNHook', **{key: value}))
    assert_names(err, key, value, prefix='CBNHook')


@FUZZ
@given(key=st.sampled_from(sorted(HOOK_VALID)), value=ANY)
def test_fuzz_hook_option(key, value):
    if HOOK_VALID[key](value):
        hook = HOOKS.build(dict(type='CBNHook', **{key: value}))
        assert getattr(hook, key) == value
    else:
        with pytest.raises(ValueError) as err:
            HOOKS.build(dict(type='CBNHook', **{key: value}))
        assert_names(err, key, value, prefix='CBNHook')


def test_unknown_hook_key_is_rejected_by_name():
    with pytest.raises(TypeError, match='intervall'):
        HOOKS.build(dict(type='CBNHook', intervall=10))


# --------------------------------------------------------- a runner config
def test_runner_config_errors_name_the_key(tmp_path):
    """Errors surface when the runner builds the model and the hooks."""
    cfg = tiny_config(tmp_path / 'norm', norm_cfg=dict(type='CBN',
                                                       momentum=2))
    cfg['experiment_name'] = f'fuzz_norm_{tmp_path.name}'
    with pytest.raises(ValueError) as err:
        Runner(**cfg)
    assert_names(err, 'momentum', 2)
    cfg = tiny_config(tmp_path / 'hook')
    cfg['experiment_name'] = f'fuzz_hook_{tmp_path.name}'
    cfg['custom_hooks'] = [dict(type='CBNHook', interval=0)]
    with pytest.raises(ValueError) as err:
        Runner(**cfg)
    assert_names(err, 'interval', 0, prefix='CBNHook')
