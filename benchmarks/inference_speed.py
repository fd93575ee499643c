# Copyright (c) mmcbn contributors. All rights reserved.
"""Eval-mode forward time: the CBN model vs the same model with BN vs the
exported (published) model, GN beside for context.

Models are built from the project's configs (Faster R-CNN R50-FPN and
PSPNet R50-D8 with the norm in backbone, neck and heads); the exported
model is the CBN config after ``mmcbn.export.export_config`` with the CBN
model's weights (the norm layers get seeded non-trivial statistics first),
and its raw outputs are compared with the CBN model's (``exported_vs_cbn``
in the JSON). All are timed in one process, round-robin, so machine
load hits them alike; ratios are to the BN model.

Usage::

    python benchmarks/inference_speed.py            # full
    python benchmarks/inference_speed.py --device cuda   # CUDA events
    python benchmarks/inference_speed.py --quick    # < 1 minute
"""
import json
import os
import os.path as osp
import statistics
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

import mmcbn  # noqa: E402,F401
from mmcbn.export import export_config  # noqa: E402

from common import (DeviceClock, benchmark_parser, device_name,  # noqa: E402
                    load_average)

MODELS = {
    'Faster R-CNN R50-FPN': (
        'mmdet', 'configs/faster_rcnn/faster-rcnn_r50_fpn_{}-all_1x_coco.py'),
    'PSPNet R50-D8': (
        'mmseg',
        'configs/pspnet/pspnet_r50-d8_{}_4xb2-80k_cityscapes-512x1024.py'),
}


def build(scope, cfg, device='cpu'):
    import importlib
    importlib.import_module(f'{scope}.utils').register_all_modules(False)
    registry = importlib.import_module(f'{scope}.registry')
    cfg = cfg.copy()
    model_cfg = cfg.model
    if model_cfg.get('pretrained') is not None:
        model_cfg.pretrained = None
    if model_cfg.backbone.get('init_cfg') is not None:
        model_cfg.backbone.init_cfg = None
    with DefaultScope.overwrite_default_scope(scope):
        torch.manual_seed(0)
        model = registry.MODELS.build(model_cfg)
    # mmengine's BaseModel.to also moves its data preprocessor
    return model.to(device).eval()


def batch_for(scope, size):
    if scope == 'mmdet':
        from mmdet.testing import demo_mm_inputs
        return demo_mm_inputs(batch_size=1, image_shapes=[(3, size, size)],
                              num_items=[1], num_classes=80)
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    sample = SegDataSample()
    sample.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size),
                             pad_shape=(size, size)))
    sample.gt_sem_seg = PixelData(
        data=torch.zeros(1, size, size, dtype=torch.long))
    gen = torch.Generator().manual_seed(0)
    return dict(
        inputs=[torch.randint(0, 255, (3, size, size), generator=gen,
                              dtype=torch.uint8)],
        data_samples=[sample])


def set_norm_values(model, seed=0):
    """Seeded, distinct running statistics and affine parameters in every
    BatchNorm (CBN included): a freshly built model has running mean 0 and
    variance 1 everywhere, which a wrong weight mapping would not change.
    Models of the same architecture get the same values."""
    from torch.nn.modules.batchnorm import _BatchNorm
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, _BatchNorm):
                continue
            c = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            module.weight.copy_(0.5 + torch.rand(c, generator=gen))
            module.bias.copy_(0.1 * torch.randn(c, generator=gen))


def _tensors(obj):
    """All tensors in a nested tuple/list/dict of network outputs."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


def compare_outputs(a, b, batch):
    """Max abs difference of two models' raw eval outputs (``mode='tensor'``,
    before any score threshold) and how many values were compared."""
    with torch.no_grad():
        outs = []
        for model in (a, b):
            data = model.data_preprocessor(batch, False)
            outs.append(_tensors(model(**data, mode='tensor')))
    if [t.shape for t in outs[0]] != [t.shape for t in outs[1]]:
        return dict(max_abs_diff=float('inf'), values=0)
    diff = max(((x.double() - y.double()).abs().max().item()
                for x, y in zip(*outs)), default=float('inf'))
    return dict(max_abs_diff=diff, values=sum(t.numel() for t in outs[0]))


def time_models(models, batch, warmup, reps, clock):
    with torch.no_grad():
        for model in models.values():
            for _ in range(warmup):
                model.test_step(batch)
        times = {name: [] for name in models}
        for _ in range(reps):
            for name, model in models.items():
                times[name].append(
                    clock.time(lambda model=model: model.test_step(batch)))
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = benchmark_parser(
        __doc__, 'smoke test of every code path (timings meaningless)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--reps', type=int, default=None)
    parser.add_argument('--device', default='cpu',
                        help='cpu or cuda (CUDA events for timing)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = DeviceClock(device)
    load_before = load_average()
    size = 64 if args.quick else 512
    reps = args.reps or (2 if args.quick else 15)
    rows, checks = [], {}
    for name, (scope, pattern) in MODELS.items():
        cfgs = {
            norm: Config.fromfile(osp.join(ROOT, pattern.format(norm)))
            for norm in ('cbn', 'bn', 'gn')
        }
        models = {norm.upper(): build(scope, cfg, device)
                  for norm, cfg in cfgs.items()}
        set_norm_values(models['CBN'])
        set_norm_values(models['BN'])
        exported = build(scope, export_config(cfgs['cbn']), device)
        exported.load_state_dict(models['CBN'].state_dict())
        models['exported'] = exported
        batch = batch_for(scope, size)
        # not timed: the exported model computes what the CBN model does
        checks[name] = compare_outputs(models['CBN'], exported, batch)
        times = time_models(models, batch, 2, reps, clock)
        for norm, t in times.items():
            rows.append(dict(model=name, norm=norm, forward_ms=1e3 * t,
                             ratio_to_bn=t / times['BN']))
    result = dict(
        date=time.strftime('%Y-%m-%d'),
        device=str(device),
        device_name=device_name(device),
        load_before=load_before,
        load_after=load_average(),
        machine=f'{device_name(device)}, {os.cpu_count()} cores, torch '
        f'{torch.__version__}, {args.threads} threads',
        input=f'1 x 3 x {size} x {size}, eval mode, test_step', rows=rows,
        exported_vs_cbn=checks)
    os.makedirs(args.out, exist_ok=True)
    suffix = '_quick' if args.quick else ''
    with open(osp.join(args.out, f'inference_speed{suffix}.json'), 'w') as f:
        json.dump(result, f, indent=1)
    print(f"{result['date']}, {result['machine']}, {result['input']}")
    print('| model | norm | forward (ms) | x BN |')
    print('|---|---|---|---|')
    for row in rows:
        print(f"| {row['model']} | {row['norm']} | {row['forward_ms']:.1f} "
              f"| {row['ratio_to_bn']:.3f} |")
    for name, check in checks.items():
        print(f"{name}: exported vs CBN outputs, max abs difference "
              f"{check['max_abs_diff']:.3g} over {check['values']} values")


if __name__ == '__main__':
    main()
