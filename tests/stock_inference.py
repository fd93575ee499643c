# Copyright (c) mmcbn contributors. All rights reserved.
"""Run a published model with stock mmdet/mmseg, mmcbn import blocked.

Usage: python stock_inference.py CONFIG CHECKPOINT det|seg OUT.pt

Loads CONFIG and CHECKPOINT the way stock code does (mmengine's
``load_checkpoint``, torch's default weights-only loader with no mmcbn
allow-list), runs the deterministic batch of ``mm_batches`` in eval mode and
saves the outputs (tensors only) to OUT.pt.
"""
import sys


class _BlockMmcbn:
    """Makes ``import mmcbn`` fail in this process."""

    def find_spec(self, name, path=None, target=None):
        if name == 'mmcbn' or name.startswith('mmcbn.'):
            raise ImportError(f'{name} is blocked: stock mmdet/mmseg only')
        return None


def main(config, checkpoint, kind, out):
    sys.meta_path.insert(0, _BlockMmcbn())
    import torch
    from mmengine.config import Config
    from mmengine.registry import DefaultScope, init_default_scope
    from mmengine.runner import load_checkpoint

    from mm_batches import det_batch, seg_batch

    try:
        import mmcbn  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit('mmcbn could be imported: the check is void')
    cfg = Config.fromfile(config)
    init_default_scope(cfg.default_scope)
    import importlib
    registry = importlib.import_module(f'{cfg.default_scope}.registry')
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = registry.MODELS.build(cfg.model)
    load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    model.eval()
    batch = det_batch(7) if kind == 'det' else seg_batch(7)
    with torch.no_grad():
        result = model.test_step(batch)
    if kind == 'det':
        outputs = [(r.pred_instances.bboxes, r.pred_instances.scores)
                   for r in result]
    else:
        outputs = [r.seg_logits.data for r in result]
    torch.save(outputs, out)
    assert 'mmcbn' not in sys.modules


if __name__ == '__main__':
    main(*sys.argv[1:5])
