# Copyright (c) mmcbn contributors. All rights reserved.
"""What the CBN window state adds to a checkpoint.

``CBNHook`` saves every layer's window (the records of its last
``window - 1`` iterations) beside the model's state dict, for exact resume.
For each config this builds the model, trains ``window`` iterations on small
random images (the window's size does not depend on the image size: an
entry holds one producer-weight-sized tensor and per-channel vectors), and
measures the serialized sizes of the model's state dict and of the window
state as the hook saves them (``torch.save`` bytes).

    python benchmarks/window_state_size.py            # 4 configs
    python benchmarks/window_state_size.py --quick    # Faster R-CNN only
"""
import copy
import io
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from common import (ROOT, benchmark_parser, machine_info,  # noqa: E402
                    markdown_table, save_png, write_json)

CONFIGS = (
    'configs/faster_rcnn/faster-rcnn_r50_fpn_cbn-neck-head_1x_coco.py',
    'configs/faster_rcnn/faster-rcnn_r50_fpn_cbn-all_1x_coco.py',
    'configs/mask_rcnn/mask-rcnn_r50_fpn_cbn-neck-head_1x_coco.py',
    'configs/pspnet/pspnet_r50-d8_cbn_4xb2-80k_cityscapes-512x1024.py',
)


def _strip_pretrained(obj):
    if isinstance(obj, dict):
        if 'pretrained' in obj:
            obj['pretrained'] = None
        if isinstance(obj.get('init_cfg'), dict) and \
                obj['init_cfg'].get('type') == 'Pretrained':
            obj['init_cfg'] = None
        for value in obj.values():
            _strip_pretrained(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _strip_pretrained(value)


def _batch(scope, step, masks=False):
    gen = torch.Generator().manual_seed(step)
    if scope == 'mmdet':
        from mmdet.testing import demo_mm_inputs
        packed = demo_mm_inputs(batch_size=2, image_shapes=[(3, 128, 128)] *
                                2, num_items=[3, 2], num_classes=80,
                                with_mask=masks)
        packed['inputs'] = [
            torch.randint(0, 255, x.shape, generator=gen, dtype=torch.uint8)
            for x in packed['inputs']
        ]
        return packed
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 255, (3, 64, 64), generator=gen,
                                    dtype=torch.uint8))
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, 19, (1, 64, 64), generator=gen))
        sample.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64),
                                 pad_shape=(64, 64)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _nbytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


def measure(rel: str) -> dict:
    import importlib

    from mmengine.config import Config
    from mmengine.optim import OptimWrapper
    from mmengine.registry import DefaultScope

    import mmcbn
    from mmcbn.resume import collect_window_state
    cfg = Config.fromfile(osp.join(ROOT, rel))
    scope = cfg.default_scope
    importlib.import_module(f'{scope}.utils').register_all_modules(False)
    model_cfg = copy.deepcopy(cfg.model)
    _strip_pretrained(model_cfg)
    if scope == 'mmseg':
        model_cfg.data_preprocessor.size = (64, 64)
    with DefaultScope.overwrite_default_scope(scope):
        torch.manual_seed(0)
        model = importlib.import_module(f'{scope}.registry').MODELS.build(
            model_cfg)
    model.train()
    layers = dict(mmcbn.cbn_layers(model))
    mmcbn.set_cbn_epoch_length(model, 7330)  # COCO at 8 GPUs x 2 images
    for layer in layers.values():
        # (the window's size when full: record from the first iteration,
        # which burn-in otherwise does only in its last window - 1)
        layer.record_burnin = True
    window = max(layer.window for layer in layers.values())
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-4))
    for step in range(window):
        mmcbn.set_cbn_iteration(model, step)
        model.train_step(_batch(scope, step, 'mask' in rel), wrapper)
    state = collect_window_state(model)
    entries = sum(len(w) for layer in layers.values()
                  for w in layer._windows)
    conv_weight = sum(
        binding.key[-2] and torch.Size(binding.key[2]).numel() * 4 *
        (layer.window - 1) for layer in layers.values()
        for binding in layer.bindings if binding is not None and
        binding.status == 'bound')
    return dict(
        config=rel,
        window=window,
        cbn_layers=len(layers),
        window_entries=entries,
        state_dict_mb=_nbytes(model.state_dict()) / 2**20,
        window_state_mb=_nbytes(dict(ranks=[state])) / 2**20,
        producer_weights_x_entries_mb=conv_weight / 2**20)


def main(argv=None) -> dict:
    parser = benchmark_parser(__doc__,
                              quick_help='Faster R-CNN neck-head only')
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [measure(rel) for rel in (CONFIGS[:1] if args.quick else CONFIGS)]
    table = markdown_table(
        ['config', 'window', 'CBN layers', 'state dict (MB)',
         'window state (MB)', 'ratio'],
        [[osp.basename(r['config'])[:-3], r['window'], r['cbn_layers'],
          f'{r["state_dict_mb"]:.1f}', f'{r["window_state_mb"]:.1f}',
          f'{r["window_state_mb"] / r["state_dict_mb"]:.2f}'] for r in rows])
    print(table)
    stem = 'window_state_size' + ('_quick' if args.quick else '')
    write_json(osp.join(args.out, stem + '.json'),
               dict(benchmark='window_state_size', machine=machine_info(),
                    quick=args.quick, rows=rows))
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.6 * len(rows)))
    names = [osp.basename(r['config'])[:-3] for r in rows]
    ax.barh(names, [r['state_dict_mb'] for r in rows], label='state dict')
    ax.barh(names, [r['window_state_mb'] for r in rows],
            left=[r['state_dict_mb'] for r in rows], label='CBN window state')
    ax.set_xlabel('checkpoint size without the optimizer (MB)')
    ax.legend(loc='lower right')
    fig.tight_layout()
    save_png(fig, osp.join(args.out, stem + '.png'))
    return dict(rows=rows)


if __name__ == '__main__':
    main()
