# Copyright (c) mmcbn contributors. All rights reserved.
"""What the upstream compensation follows in a model built from a config.

Builds each config's model (no weights are loaded, no data is read), turns
its CBN layers to ``compensate='upstream'`` without burn-in where they are
not already, runs two training iterations on small random images, and
reports per config: the CBN layers, those fed by a followed norm, the
feeding norms followed and the paths not followed, by reason (what
``CBNHook`` logs after the first iteration of a training run)::

    python tools/upstream_coverage.py          # the shipped CBN configs
    python tools/upstream_coverage.py CONFIG [CONFIG ...] --form exact
    python tools/upstream_coverage.py --out coverage.json

A path not followed keeps the producer-only compensation (the paper's).
"""
import argparse
import copy
import json
import os
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import mmcbn  # noqa: E402,F401
from mmcbn import set_cbn_iteration  # noqa: E402
from mmcbn.control import coverage_text, upstream_coverage  # noqa: E402

#: The shipped CBN configs, one per model.
SHIPPED = [
    'configs/mask_rcnn/mask-rcnn_r50_fpn_cbn-all_1x_coco.py',
    'configs/faster_rcnn/faster-rcnn_r50_fpn_cbn-all_1x_coco.py',
    'configs/retinanet/retinanet_r50_fpn_cbn-head_1x_coco.py',
    'configs/pspnet/pspnet_r50-d8_cbn_4xb2-80k_ade20k-512x512.py',
    'configs/deeplabv3plus/'
    'deeplabv3plus_r50-d8_cbn_4xb2-80k_ade20k-512x512.py',
]
#: Side of the random training images (CPU time).
SIZE = 128


def _cbn_cfgs(cfg, options):
    """Update every CBN/SyncCBN norm config in place; their count."""
    count = 0
    if isinstance(cfg, dict):
        if cfg.get('type') in ('CBN', 'CBN2d', 'SyncCBN', 'SyncCBN2d'):
            cfg.update(options)
            return 1
        for value in cfg.values():
            count += _cbn_cfgs(value, options)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            count += _cbn_cfgs(value, options)
    return count


def _no_weights(cfg):
    """No checkpoint is loaded (no network, no files)."""
    if isinstance(cfg, dict):
        if 'init_cfg' in cfg:
            cfg['init_cfg'] = None
        cfg.pop('pretrained', None)
        for value in cfg.values():
            _no_weights(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            _no_weights(value)


def _det_batch(step):
    from mmdet.testing import demo_mm_inputs
    packed = demo_mm_inputs(batch_size=2,
                            image_shapes=[(3, SIZE, SIZE)] * 2,
                            num_items=[3, 2], num_classes=80,
                            with_mask=True)
    gen = torch.Generator().manual_seed(step)
    packed['inputs'] = [torch.randint(0, 255, x.shape, generator=gen,
                                      dtype=torch.uint8)
                        for x in packed['inputs']]
    return packed


def _seg_batch(step):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    gen = torch.Generator().manual_seed(step)
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 255, (3, SIZE, SIZE), generator=gen,
                                    dtype=torch.uint8))
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=torch.randint(
            0, 19, (1, SIZE, SIZE), generator=gen))
        shape = (SIZE, SIZE)
        sample.set_metainfo(dict(img_shape=shape, ori_shape=shape,
                                 pad_shape=shape))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def build_model(path, form=None):
    """The config's model with upstream-compensated CBN layers, and its
    codebase ('mmdet' or 'mmseg')."""
    import importlib

    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    cfg = Config.fromfile(path)
    scope = cfg.get('default_scope', 'mmdet')
    model_cfg = copy.deepcopy(cfg.model)
    options = dict(compensate='upstream', burnin=0, burnin_by_epoch=False)
    if form is not None:
        options['upstream_form'] = form
    if not _cbn_cfgs(model_cfg, options):
        raise SystemExit(f'{path}: no CBN layer in its model')
    _no_weights(model_cfg)
    if scope == 'mmseg':
        model_cfg.data_preprocessor.size = (SIZE, SIZE)
    importlib.import_module(f'{scope}.utils').register_all_modules(False)
    registry = importlib.import_module(f'{scope}.registry')
    with DefaultScope.overwrite_default_scope(scope):
        torch.manual_seed(0)
        model = registry.MODELS.build(model_cfg)
    mmcbn.name_cbn_layers(model)
    return model, scope


def coverage_of(path, form=None, steps=2):
    """Train ``steps`` iterations; :func:`mmcbn.control.upstream_coverage`
    (its reasons' counts as a dict) and its line."""
    from mmengine.optim import OptimWrapper
    model, scope = build_model(path, form)
    batch = _det_batch if scope == 'mmdet' else _seg_batch
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-3))
    model.train()
    for step in range(steps):
        set_cbn_iteration(model, step)
        model.train_step(batch(step), wrapper)
    cov = upstream_coverage(model)
    line = coverage_text(cov)
    cov['fallbacks'] = dict(cov['fallbacks'])
    return cov, line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('configs', nargs='*', default=SHIPPED)
    parser.add_argument('--form', choices=('exact', 'fast', 'mean'),
                        help="upstream_form (default: the config's)")
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--out', help='write the reports as JSON')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    reports = {}
    for path in args.configs:
        cov, line = coverage_of(path, args.form)
        reports[path] = cov
        print(f'{osp.basename(path)}: {line}', flush=True)
    if args.out:
        tmp = args.out + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(reports, f, indent=1)
        os.replace(tmp, args.out)
    return reports


if __name__ == '__main__':
    main()
