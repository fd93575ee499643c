# Copyright (c) mmcbn contributors. All rights reserved.
"""Deterministic mmdet/mmseg batches (no mmcbn import: the stock-inference
process uses them too)."""
import torch


def det_batch(step):
    from mmdet.testing import demo_mm_inputs
    packed = demo_mm_inputs(
        batch_size=2, image_shapes=[(3, 96, 128), (3, 128, 96)],
        num_items=[3, 2], num_classes=80)
    gen = torch.Generator().manual_seed(step)
    packed['inputs'] = [
        torch.randint(0, 255, x.shape, generator=gen, dtype=torch.uint8)
        for x in packed['inputs']
    ]
    return packed


def seg_batch(step):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    gen = torch.Generator().manual_seed(step)
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(
            torch.randint(0, 255, (3, 64, 64), generator=gen,
                          dtype=torch.uint8))
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=torch.randint(
            0, 19, (1, 64, 64), generator=gen))
        sample.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64),
                                 pad_shape=(64, 64)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)
