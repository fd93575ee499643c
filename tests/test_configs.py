# Copyright (c) mmcbn contributors. All rights reserved.
"""The configs under configs/: loading, norm placement, one training step.

Every full config (configs/_base_/ holds shared parts, configs/demo/ belongs
to the demo) is loaded with ``mmengine.Config.fromfile``, checked for the
placement of its norm and, for CBN configs, the paper's settings, and built
once to run one training step (forward in loss mode and backward) on a tiny
random batch on CPU: 2 images of 64x96 with 2-3 boxes (and masks) for mmdet,
2 crops of 64x64 for mmseg. For CBN configs every CBN layer that runs in
training mode must be bound to the conv that feeds it, and layers in eval
mode (frozen stages, ``norm_eval=True`` backbones) must not have run.
Nothing is downloaded: pretrained checkpoints are removed from the model
config, and ``init_weights`` is never called.

Each CBN config and its BN/GN/SyncBN baselines must be the same config up to
``norm_cfg``/``norm_eval`` values and the mmcbn import and hook.
"""
import copy
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mmengine import Config
from mmengine.logging import MMLogger
from mmengine.registry import HOOKS, init_default_scope
from torch import nn

import mmcbn

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / 'configs'
#: configs/demo/ belongs to the demo, which tests its own configs.
EXCLUDED_DIRS = {'_base_', 'demo'}

#: The norm-specific files: ``<model>_<norm>-<placement>_...`` for mmdet,
#: ``<model>_r50-d8_<norm>_...`` for mmseg.
NORM_TOKEN = re.compile(r'_(synccbn|syncbn|cbn|bn|gn)(?=[-_])')
BASELINES = ('bn', 'gn', 'syncbn')

#: Epoch lengths given to CBNHook: COCO train2017 (117266 images with
#: annotations) at 8 GPUs x 2 images; Cityscapes train (2975) at 4 x 2, which
#: also shows that mmseg's burn-in is not read as epochs.
ITERS_PER_EPOCH = dict(mmdet=7330, mmseg=372)

#: Frozen BN of mmdet's backbones (norm_eval=True), kept by every config.
FROZEN_BACKBONE_NORM = dict(type='BN', requires_grad=True)

DET_IMAGE = (3, 64, 96)
SEG_CROP = (64, 64)


def _full_configs():
    configs = []
    for path in sorted(CONFIG_DIR.rglob('*.py')):
        rel = path.relative_to(CONFIG_DIR)
        if EXCLUDED_DIRS & set(rel.parts[:-1]):
            continue
        configs.append(rel.as_posix())
    return configs


CONFIGS = _full_configs()
_CACHE = {}


def _load(rel):
    if rel not in _CACHE:
        _CACHE[rel] = Config.fromfile(str(CONFIG_DIR / rel))
    return _CACHE[rel]


def _norm_of(rel):
    """The norm named in a config's file name (None if it names none)."""
    match = NORM_TOKEN.search(Path(rel).name)
    return match.group(1) if match else None


def _sibling(rel, norm):
    match = NORM_TOKEN.search(Path(rel).name)
    name = Path(rel).name
    name = f'{name[:match.start(1)]}{norm}{name[match.end(1):]}'
    return (Path(rel).parent / name).as_posix()


def _plain(cfg_dict):
    """A ConfigDict as plain dicts/lists, without mmengine's ``_scope_``."""
    if isinstance(cfg_dict, dict):
        return {k: _plain(v) for k, v in cfg_dict.items() if k != '_scope_'}
    if isinstance(cfg_dict, (list, tuple)):
        return [_plain(v) for v in cfg_dict]
    return cfg_dict


def _norm_positions(obj, path=''):
    """Yield ``(path, module dict)`` for every dict holding a norm_cfg."""
    if isinstance(obj, dict):
        if 'norm_cfg' in obj:
            yield path, obj
        for key, value in obj.items():
            yield from _norm_positions(value, f'{path}.{key}'.lstrip('.'))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _norm_positions(value, f'{path}.{i}')


CBN_CONFIGS = [rel for rel in CONFIGS if _norm_of(rel) == 'cbn']


# --------------------------------------------------------------- discovery
def test_configs_found():
    names = {Path(rel).parent.as_posix() for rel in CONFIGS}
    assert {
        'faster_rcnn', 'mask_rcnn', 'retinanet', 'pspnet', 'deeplabv3plus'
    } <= names
    assert len(CBN_CONFIGS) >= 9
    assert not any(rel.startswith('demo/') for rel in CONFIGS)
    unnamed = [rel for rel in CONFIGS if _norm_of(rel) is None]
    assert not unnamed, (
        f'no norm (cbn/synccbn/bn/gn/syncbn) in the names {unnamed}')
    synccbn = {rel for rel in CONFIGS if _norm_of(rel) == 'synccbn'}
    assert synccbn == {
        'faster_rcnn/faster-rcnn_r50_fpn_synccbn-neck-head_1x_coco.py',
        'mask_rcnn/mask-rcnn_r50_fpn_synccbn-neck-head_1x_coco.py',
        'pspnet/pspnet_r50-d8_synccbn_4xb2-80k_cityscapes-512x1024.py'
    }


@pytest.mark.parametrize(
    'path',
    sorted(
        p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob('*.py')
        if p.relative_to(CONFIG_DIR).parts[0] != 'demo'))
def test_header_comment(path):
    """Every file, shared parts included, starts by saying what it is for."""
    lines = (CONFIG_DIR / path).read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith('#'):
            break
        header.append(line)
    assert len(header) >= 2, f'{path} has no header comment'


# ------------------------------------------------------- config contents
@pytest.mark.parametrize('rel', CONFIGS)
def test_norm_placement(rel):
    """Every norm position uses the config's norm_cfg, except the frozen BN
    of a norm_eval=True backbone, and the settings are the intended ones."""
    cfg = _load(rel)
    norm = _norm_of(rel)
    assert 'norm_cfg' in cfg, f'{rel} defines no top-level norm_cfg'
    norm_cfg = _plain(cfg.norm_cfg)
    model = _plain(cfg.model)
    assert 'NormSetByEachConfig' not in repr(model), (
        f'{rel} leaves a norm position of its shared base unset')

    placed = []
    for path, module in _norm_positions(model):
        if module.get('norm_eval') is True:
            # mmdet's frozen BN backbone: no placement, the same for all.
            assert path == 'backbone', f'{rel}: norm_eval=True in {path}'
            assert module['norm_cfg'] == FROZEN_BACKBONE_NORM, (rel, path)
            continue
        assert module['norm_cfg'] == norm_cfg, (
            f'{rel}: {path}.norm_cfg={module["norm_cfg"]} is not the '
            f'config\'s norm_cfg {norm_cfg}')
        if 'norm_eval' in module:
            assert module['norm_eval'] is False, (rel, path)
        placed.append(path)
    assert placed, f'{rel}: the norm is placed nowhere'

    # Where the norm goes, per model family.
    if '-neck-head' in rel:
        assert 'neck' in placed and 'roi_head.bbox_head' in placed
        assert 'backbone' not in placed
        assert model['backbone']['norm_eval'] is True
    if '-all' in rel:
        assert {'backbone', 'neck', 'roi_head.bbox_head'} <= set(placed)
        assert model['backbone']['frozen_stages'] == 1
    if 'roi_head' in model:
        bbox_head = model['roi_head']['bbox_head']
        assert bbox_head['type'] == 'Shared4Conv1FCBBoxHead'
        if 'mask_head' in model['roi_head']:
            assert 'roi_head.mask_head' in placed
            assert model['roi_head']['mask_head']['num_convs'] == 4
    if rel.startswith('retinanet/'):
        assert placed == ['bbox_head']
        assert model['bbox_head']['type'] == 'RetinaHead'
    if cfg.default_scope == 'mmseg':
        assert set(placed) == {'backbone', 'decode_head', 'auxiliary_head'}

    # Schedule and batch: 1x (12 epochs) for mmdet, 80k iterations for
    # mmseg, 2 images/crops per GPU everywhere.
    assert cfg.train_dataloader.batch_size == 2
    if cfg.default_scope == 'mmdet':
        assert cfg.train_cfg.type == 'EpochBasedTrainLoop'
        assert cfg.train_cfg.max_epochs == 12
        assert cfg.train_dataloader.dataset.type == 'CocoDataset'
    else:
        assert cfg.default_scope == 'mmseg'
        assert cfg.train_cfg.type == 'IterBasedTrainLoop'
        assert cfg.train_cfg.max_iters == 80000
        dataset = cfg.train_dataloader.dataset.type
        assert dataset == ('CityscapesDataset'
                           if 'cityscapes' in rel else 'ADE20KDataset')

    expected_type = {'cbn': 'CBN', 'bn': 'BN', 'gn': 'GN', 'syncbn': 'SyncBN',
                     'synccbn': 'SyncCBN'}
    assert norm_cfg['type'] == expected_type[norm]
    if norm == 'gn':
        # DeepLabV3+'s 48-channel low-level bottleneck needs 16 groups.
        groups = 16 if rel.startswith('deeplabv3plus/') else 32
        assert norm_cfg['num_groups'] == groups
    hooks = [h['type'] for h in cfg.get('custom_hooks', [])]
    if norm in ('cbn', 'synccbn'):
        assert cfg.custom_imports == dict(
            imports=['mmcbn'], allow_failed_imports=False)
        assert hooks.count('CBNHook') == 1
        assert norm_cfg['window'] == 4
        if cfg.default_scope == 'mmdet':
            assert norm_cfg['burnin'] == 3
            assert norm_cfg['burnin_by_epoch'] is True
        else:
            # Iteration-based schedule: burn-in in iterations, a quarter.
            assert norm_cfg['burnin'] == 20000 == cfg.train_cfg.max_iters // 4
            assert not norm_cfg.get('burnin_by_epoch', False)
    else:
        assert 'CBNHook' not in hooks
        assert 'CBN' not in repr(model)


def _without_norm(cfg):
    """The config with every norm-related difference masked out."""

    def mask(obj):
        if isinstance(obj, dict):
            return {
                k: '<norm>' if k in ('norm_cfg', 'norm_eval') else mask(v)
                for k, v in obj.items()
            }
        if isinstance(obj, list):
            return [mask(v) for v in obj]
        return obj

    d = _plain(cfg.to_dict())
    imports = d.pop('custom_imports', None)
    if imports is not None:
        rest = [m for m in imports['imports'] if m != 'mmcbn']
        if rest:
            d['custom_imports'] = dict(imports, imports=rest)
    hooks = [h for h in d.pop('custom_hooks', []) if h['type'] != 'CBNHook']
    if hooks:
        d['custom_hooks'] = hooks
    return mask(d)


def _diff(a, b, path=''):
    """Paths where two plain structures differ (for readable failures)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f'{path}.{k}: only in one')
            else:
                out += _diff(a[k], b[k], f'{path}.{k}')
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d for i, (x, y) in enumerate(zip(a, b))
            for d in _diff(x, y, f'{path}.{i}')
        ]
    return [] if a == b else [f'{path}: {a!r} != {b!r}']


@pytest.mark.parametrize('rel', CBN_CONFIGS)
def test_baselines_differ_only_in_norm(rel):
    expected = ('bn', ) if rel.startswith('retinanet/') else BASELINES
    cbn = _without_norm(_load(rel))
    for norm in expected:
        other = _sibling(rel, norm)
        assert other in CONFIGS, f'{rel}: baseline {other} is missing'
        differences = _diff(cbn, _without_norm(_load(other)))
        assert not differences, (
            f'{rel} and {other} differ beyond the norm: {differences}')


@pytest.mark.parametrize(
    'rel', [r for r in CONFIGS if _norm_of(r) == 'synccbn'])
def test_synccbn_differs_from_cbn_in_the_norm_type_only(rel):
    synccbn = _plain(_load(rel).to_dict())
    cbn = _plain(_load(_sibling(rel, 'cbn')).to_dict())

    def retype(obj):
        if isinstance(obj, dict):
            return {
                k: ('CBN' if k == 'type' and v == 'SyncCBN' else retype(v))
                for k, v in obj.items()
            }
        if isinstance(obj, list):
            return [retype(v) for v in obj]
        return obj

    assert 'SyncCBN' in repr(synccbn['model'])
    assert not _diff(retype(synccbn), cbn), _diff(retype(synccbn), cbn)


@pytest.mark.parametrize(
    'rel', [r for r in CONFIGS if _norm_of(r) not in ('cbn', None)])
def test_every_baseline_has_a_cbn_config(rel):
    assert _sibling(rel, 'cbn') in CONFIGS


# ------------------------------------------------------- one training step
def _strip_pretrained(obj):
    """Remove every pretrained checkpoint from a model config (in place)."""
    if isinstance(obj, dict):
        if 'pretrained' in obj:
            obj['pretrained'] = None
        init_cfg = obj.get('init_cfg')
        if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
            obj['init_cfg'] = None
        for value in obj.values():
            _strip_pretrained(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _strip_pretrained(value)


def _det_setup(cfg):
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    model_cfg = copy.deepcopy(cfg.model)
    train_cfg = model_cfg.train_cfg
    if 'rcnn' in train_cfg:
        # Fewer RoIs keep the 4conv1fc head cheap on CPU; the placement and
        # the code paths are those of the full config.
        train_cfg.rpn_proposal.update(nms_pre=300, max_per_img=100)
        train_cfg.rcnn.sampler.num = 64
    with_mask = 'mask_head' in model_cfg.get('roi_head', {})
    data = demo_mm_inputs(
        batch_size=2,
        image_shapes=[DET_IMAGE, DET_IMAGE],
        num_items=[2, 3],
        num_classes=10,
        with_mask=with_mask)
    return MODELS, model_cfg, data


def _seg_setup(cfg):
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    model_cfg = copy.deepcopy(cfg.model)
    # mmseg pads every training batch to the crop size (512x1024 here).
    model_cfg.data_preprocessor.size = SEG_CROP
    num_classes = model_cfg.decode_head.num_classes
    gen = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(
            torch.randint(
                0, 256, (3, ) + SEG_CROP, generator=gen, dtype=torch.uint8))
        sample = SegDataSample(
            metainfo=dict(img_shape=SEG_CROP, ori_shape=SEG_CROP))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(
                0, num_classes, (1, ) + SEG_CROP, generator=gen))
        samples.append(sample)
    return MODELS, model_cfg, dict(inputs=inputs, data_samples=samples)


def _expected_producer(norm_name):
    """The conv that feeds a norm layer, from mmcv/mmdet/mmseg naming."""
    parent, _, leaf = norm_name.rpartition('.')
    if leaf in ('bn', 'gn'):  # ConvModule: conv -> norm
        return f'{parent}.conv'
    match = re.fullmatch(r'bn(\d+)', leaf)  # ResNet: convK -> bnK
    if match:
        return f'{parent}.conv{match.group(1)}'.lstrip('.')
    if leaf.isdigit():  # Sequential(conv, norm, ...): stem, downsample
        return f'{parent}.{int(leaf) - 1}'
    raise AssertionError(f'unexpected norm layer name {norm_name}')


def _frozen_prefixes(model_cfg):
    """Names of the backbone parts that frozen_stages keeps in eval mode."""
    stages = model_cfg.backbone.get('frozen_stages', -1)
    if stages < 0:
        return ()
    return ('backbone.bn1', 'backbone.stem.') + tuple(
        f'backbone.layer{i}.' for i in range(1, stages + 1))


@pytest.fixture
def one_thread():
    """Run on one thread: on a shared 2-core machine, two busy-waiting
    threads per process make an R50 step several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize('rel', CONFIGS)
def test_one_training_step(rel, one_thread):
    cfg = _load(rel)
    norm = _norm_of(rel)
    init_default_scope(cfg.default_scope)
    setup = _det_setup if cfg.default_scope == 'mmdet' else _seg_setup
    registry, model_cfg, data = setup(cfg)
    _strip_pretrained(model_cfg)
    torch.manual_seed(0)
    model = registry.build(model_cfg)
    model.train()

    # Modules that train() leaves in eval mode must not update statistics.
    eval_norms = {
        name: m.num_batches_tracked.clone()
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training
    }
    if model_cfg.backbone.get('norm_eval'):
        assert eval_norms and all(
            n.startswith('backbone.') for n in eval_norms)
        assert not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
            for m in model.backbone.modules())

    cbn = dict(mmcbn.cbn_layers(model))
    hook = runner = None
    if norm in ('cbn', 'synccbn'):
        assert cbn, f'{rel} built no CBN layer'
        # Drive the layers with the config's own hook, as a runner would.
        hooks = [HOOKS.build(h) for h in cfg.custom_hooks]
        hook = next(h for h in hooks if isinstance(h, mmcbn.CBNHook))
        runner = SimpleNamespace(
            model=model,
            train_dataloader=range(ITERS_PER_EPOCH[cfg.default_scope]),
            logger=MMLogger.get_instance('test_configs'),
            iter=0)
        hook.before_train(runner)
        hook.before_train_iter(runner, 0, data)
        expected_burnin = (3 * ITERS_PER_EPOCH['mmdet']
                           if cfg.default_scope == 'mmdet' else 20000)
        for name, layer in cbn.items():
            assert layer.window == 4
            assert layer.burnin_iters == expected_burnin, name
            assert layer.window_at(0) == 1  # iteration 0 is in burn-in
    else:
        assert not cbn

    data = model.data_preprocessor(data, True)
    losses = model(**data, mode='loss')
    loss, log_vars = model.parse_losses(losses)
    assert log_vars, rel
    for key, value in log_vars.items():
        value = float(torch.as_tensor(value).detach())
        assert math.isfinite(value), f'{rel}: {key}={value}'
    loss.backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert torch.isfinite(param.grad).all(), f'{rel}: {name}.grad'

    for name, count in eval_norms.items():
        module = model.get_submodule(name)
        assert not module.training
        assert torch.equal(module.num_batches_tracked, count), (
            f'{rel}: {name} is in eval mode but updated its statistics')

    if norm not in ('cbn', 'synccbn'):
        return
    assert all(isinstance(layer, mmcbn.SyncCBN2d) == (norm == 'synccbn')
               for layer in cbn.values())
    hook.after_train_iter(runner, 0, data, losses)
    report = mmcbn.binding_report(model)
    frozen = _frozen_prefixes(model_cfg)
    ran = [name for name, layer in cbn.items() if layer.training]
    assert ran, f'{rel}: no CBN layer ran in training mode'
    for name, layer in cbn.items():
        if not layer.training:
            # Only the frozen stages of a trained backbone are in eval mode.
            assert name.startswith(frozen), f'{rel}: {name} in eval mode'
            assert report[name] == ['not run'], (name, report[name])
            continue
        assert not name.startswith(frozen), f'{rel}: {name} trains'
        statuses = [
            b.status if b is not None else 'not run' for b in layer.bindings
        ]
        assert statuses and set(statuses) == {'bound'}, (
            f'{rel}: {name} -> {report[name]}')
        assert set(report[name]) == {_expected_producer(name)
                                     }, (f'{rel}: {name} -> {report[name]}')
        assert layer.weight.grad is not None, name
    if rel.startswith('retinanet/'):
        # The shared head runs once per FPN level: one window per level.
        levels = len(model_cfg.bbox_head.anchor_generator.strides)
        for name in ran:
            assert name.startswith('bbox_head.'), name
            assert len(cbn[name].bindings) == levels, (name, report[name])
