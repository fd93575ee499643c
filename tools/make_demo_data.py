# Copyright (c) mmcbn contributors. All rights reserved.
"""Generate the small synthetic datasets of the demo (no downloads).

Every image is a scene of 2-6 objects of three classes that differ in shape
*and* texture, never in colour alone: colours are drawn from one
distribution shared by all classes.

===========  ===========  ==============================================
class        shape        texture
===========  ===========  ==============================================
circle       disc         stripes (random orientation, period 6-10 px)
triangle     triangle     checkerboard (random rotation, cells 4-7 px)
rectangle    rotated box  speckle (random mixtures in 3x3 px blocks)
===========  ===========  ==============================================

Objects have random sizes, positions, rotations and colours and may overlap
(each keeps at least half of its area visible); the background is a smooth
random gradient with noise and distractor lines. The same scenes are
written in two real formats::

    OUT/coco/annotations/instances_{train,val}.json  COCO instances: bbox,
                                                     area, iscrowd=0, RLE
                                                     segmentation (visible
                                                     part of each object)
    OUT/coco/{train,val}/000000.jpg ...
    OUT/seg/img_dir/{train,val}/000000.jpg ...       mmseg folder layout
    OUT/seg/ann_dir/{train,val}/000000.png ...       label maps: 0 background,
                                                     1-3 classes, 255 object
                                                     borders (ignored)
    OUT/meta.json                                    what was generated

The output is a function of ``--seed``, ``--num-train``, ``--num-val`` and
``--size`` only (same arguments, identical files).

Example::

    python tools/make_demo_data.py --out data/demo --seed 0 \\
        --num-train 300 --num-val 60 --size 128
"""
import argparse
import json
import os
import os.path as osp
import shutil
import sys
import time
from typing import Dict, List, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

#: Bump when the generated content changes (part of meta.json).
GENERATOR_VERSION = 1
CLASSES = ('circle', 'triangle', 'rectangle')
SEG_CLASSES = ('background', ) + CLASSES
SEG_PALETTE = [[0, 0, 0], [220, 20, 60], [0, 160, 0], [30, 80, 255]]
IGNORE_INDEX = 255
MIN_OBJECTS, MAX_OBJECTS = 2, 6
#: An object keeps at least this fraction of its area visible.
MIN_VISIBLE = 0.5
JPEG_QUALITY = 95


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Generate the synthetic COCO and mmseg demo datasets')
    parser.add_argument(
        '--out',
        default='data/demo',
        help='output folder (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument(
        '--num-train', type=int, default=300, help='training images')
    parser.add_argument(
        '--num-val', type=int, default=60, help='validation images')
    parser.add_argument(
        '--size', type=int, default=128, help='image side in pixels')
    parser.add_argument('--quiet', action='store_true', help='print nothing')
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_val < 1:
        parser.error('--num-train and --num-val must be >= 1')
    if args.size < 48:
        parser.error('--size must be >= 48')
    return args


def expected_meta(seed: int, num_train: int, num_val: int, size: int) -> dict:
    """The ``meta.json`` written for these arguments."""
    return dict(
        generator='tools/make_demo_data.py',
        version=GENERATOR_VERSION,
        seed=seed,
        num_train=num_train,
        num_val=num_val,
        size=size,
        classes=list(CLASSES),
        seg_classes=list(SEG_CLASSES),
        seg_palette=SEG_PALETTE,
        ignore_index=IGNORE_INDEX)


def is_generated(out: str, seed: int, num_train: int, num_val: int,
                 size: int) -> bool:
    """Whether ``out`` holds a complete dataset made with these arguments."""
    path = osp.join(out, 'meta.json')
    if not osp.isfile(path):
        return False
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return meta == expected_meta(seed, num_train, num_val, size)


# ------------------------------------------------------------------ drawing
def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _colour_pair(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Two colours far enough apart for the texture to be visible."""
    while True:
        a, b = _random_colour(rng), _random_colour(rng)
        if np.abs(a - b).mean() > 70:
            return a, b


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random gradient, low-frequency blobs, noise, distractors."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    # low-frequency blobs: upsampled coarse noise
    coarse = rng.normal(0, 25, (6, 6, 3)).astype(np.float32)
    img += cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    # distractor lines (not objects)
    for _ in range(int(rng.integers(2, 6))):
        p0 = tuple(int(v) for v in rng.integers(0, size, 2))
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        colour = tuple(float(v) for v in _random_colour(rng))
        cv2.line(img, p0, p1, colour, int(rng.integers(1, 3)))
    return img


def _shape_mask(cls: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """A filled shape of class ``cls`` at a random place, size, rotation."""
    mask = np.zeros((size, size), np.uint8)
    lo, hi = 0.07 * size, 0.2 * size  # "radius" range
    r = rng.uniform(lo, hi)
    cx, cy = rng.uniform(r * 0.6, size - r * 0.6, 2)
    theta = rng.uniform(0, 2 * np.pi)
    if cls == 0:  # circle
        cv2.circle(mask, (int(round(cx)), int(round(cy))), int(round(r)), 1,
                   -1)
    elif cls == 1:  # triangle: jittered equilateral
        angles = theta + np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(
            -0.25, 0.25, 3)
        radii = r * rng.uniform(1.0, 1.3, 3)
        pts = np.stack(
            [cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    else:  # rotated rectangle, aspect 1:1 to 1:2.5
        w = 2 * r * rng.uniform(0.8, 1.1)
        h = w / rng.uniform(1.0, 2.5)
        box = cv2.boxPoints(((cx, cy), (w, h), np.degrees(theta)))
        cv2.fillPoly(mask, [np.round(box).astype(np.int32)], 1)
    return mask.astype(bool)


def _texture(cls: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) class-specific texture in two random colours."""
    a, b = _colour_pair(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    u = np.cos(theta) * xx + np.sin(theta) * yy
    v = -np.sin(theta) * xx + np.cos(theta) * yy
    if cls == 0:  # stripes
        period = rng.uniform(6, 10)
        p = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 6.3))
        p = (p > 0.5).astype(np.float32) * 0.8 + 0.1 * p
    elif cls == 1:  # checkerboard
        cell = rng.uniform(4, 7)
        p = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    else:  # speckle: 3x3 blocks of random mixtures
        n = (size + 2) // 3
        cells = rng.random((n, n))
        p = np.kron(cells, np.ones((3, 3)))[:size, :size].astype(np.float32)
    return a * p[..., None] + b * (1 - p[..., None])


def make_scene(rng: np.random.Generator,
               size: int) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """One image (uint8 BGR) and its objects ``(class, visible mask)``."""
    img = _background(rng, size)
    target = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    # every scene gets different classes where possible
    classes = list(rng.permutation(len(CLASSES)))
    objects: List[Tuple[int, np.ndarray, np.ndarray]] = []  # cls, full, vis
    attempts = 0
    while len(objects) < target and attempts < 100:
        attempts += 1
        if len(objects) < len(classes):
            cls = int(classes[len(objects)])
        else:
            cls = int(rng.integers(len(CLASSES)))
        full = _shape_mask(cls, rng, size)
        area = full.sum()
        if area < 30:
            continue
        # the new object is on top: earlier objects must stay visible enough
        if any((vis & ~full).sum() < MIN_VISIBLE * f.sum()
               for _, f, vis in objects):
            continue
        objects = [(c, f, vis & ~full) for c, f, vis in objects]
        objects.append((cls, full, full.copy()))
        img[full] = _texture(cls, rng, size)[full]
    img += rng.normal(0, 6, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img[..., ::-1].copy(), [(c, vis) for c, _, vis in objects]


def seg_label(objects: List[Tuple[int, np.ndarray]], size: int) -> np.ndarray:
    """Label map: 0 background, 1..3 classes, 255 on object borders."""
    label = np.zeros((size, size), np.uint8)
    inst = np.zeros((size, size), np.int32)
    for k, (cls, vis) in enumerate(objects, 1):
        label[vis] = cls + 1
        inst[vis] = k
    # the outermost pixel ring of every visible object part is ignored
    pad = np.pad(inst, 1, mode='edge')
    border = np.zeros((size, size), bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        border |= pad[dy:dy + size, dx:dx + size] != inst
    label[border & (inst > 0)] = IGNORE_INDEX
    return label


def coco_annotation(vis: np.ndarray, cls: int, image_id: int,
                    ann_id: int) -> dict:
    rle = mask_utils.encode(np.asfortranarray(vis.astype(np.uint8)))
    ys, xs = np.nonzero(vis)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return dict(
        id=ann_id,
        image_id=image_id,
        category_id=cls + 1,
        bbox=[float(x0), float(y0),
              float(x1 - x0),
              float(y1 - y0)],
        area=float(vis.sum()),
        iscrowd=0,
        segmentation=dict(
            size=[int(v) for v in rle['size']],
            counts=rle['counts'].decode('ascii')))


# ----------------------------------------------------------------- writing
def write_split(out: str, split: str, num: int, size: int,
                rng: np.random.Generator) -> Dict[str, int]:
    coco_img_dir = osp.join(out, 'coco', split)
    seg_img_dir = osp.join(out, 'seg', 'img_dir', split)
    seg_ann_dir = osp.join(out, 'seg', 'ann_dir', split)
    for d in (coco_img_dir, seg_img_dir, seg_ann_dir):
        os.makedirs(d, exist_ok=True)
    images, annotations = [], []
    jpeg = [int(cv2.IMWRITE_JPEG_QUALITY), JPEG_QUALITY]
    png = [int(cv2.IMWRITE_PNG_COMPRESSION), 9]
    for i in range(num):
        img, objects = make_scene(rng, size)
        name = f'{i:06d}'
        ok = cv2.imwrite(osp.join(coco_img_dir, name + '.jpg'), img, jpeg)
        ok &= cv2.imwrite(osp.join(seg_img_dir, name + '.jpg'), img, jpeg)
        ok &= cv2.imwrite(
            osp.join(seg_ann_dir, name + '.png'), seg_label(objects, size),
            png)
        if not ok:
            raise OSError(f'could not write images of {name} under {out}')
        image_id = i + 1
        images.append(
            dict(
                id=image_id, file_name=name + '.jpg', width=size, height=size))
        for cls, vis in objects:
            annotations.append(
                coco_annotation(vis, cls, image_id,
                                len(annotations) + 1))
    coco = dict(
        info=dict(
            description=f'mmcbn synthetic demo data, {split}',
            version=str(GENERATOR_VERSION)),
        licenses=[],
        images=images,
        annotations=annotations,
        categories=[
            dict(id=k + 1, name=name, supercategory='shape')
            for k, name in enumerate(CLASSES)
        ])
    ann_dir = osp.join(out, 'coco', 'annotations')
    os.makedirs(ann_dir, exist_ok=True)
    with open(osp.join(ann_dir, f'instances_{split}.json'), 'w') as f:
        json.dump(coco, f)
    return dict(images=len(images), objects=len(annotations))


def generate(out: str = 'data/demo',
             seed: int = 0,
             num_train: int = 300,
             num_val: int = 60,
             size: int = 128,
             verbose: bool = True) -> dict:
    """Write both datasets into ``out`` (replacing earlier ones).

    Returns:
        dict: The contents of ``meta.json``, with per-split counts.
    """
    start = time.perf_counter()
    for sub in ('coco', 'seg', 'meta.json'):
        path = osp.join(out, sub)
        if osp.isdir(path):
            shutil.rmtree(path)
        elif osp.exists(path):
            os.remove(path)
    os.makedirs(out, exist_ok=True)
    # independent streams: the val split does not depend on --num-train
    train_rng, val_rng = [
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)
    ]
    counts = dict(
        train=write_split(out, 'train', num_train, size, train_rng),
        val=write_split(out, 'val', num_val, size, val_rng))
    meta = expected_meta(seed, num_train, num_val, size)
    # meta.json last: its presence marks a complete dataset
    with open(osp.join(out, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    if verbose:
        took = time.perf_counter() - start
        print(f'Wrote the demo data into {out} in {took:.1f} s '
              f'(seed {seed}, {size}x{size} images, classes '
              f'{", ".join(CLASSES)}):')
        for split, c in counts.items():
            print(f'  {split}: {c["images"]} images, {c["objects"]} objects')
            print(f'    COCO: {osp.join(out, "coco", "annotations")}/'
                  f'instances_{split}.json + '
                  f'{osp.join(out, "coco", split)}/*.jpg')
            print(f'    mmseg: {osp.join(out, "seg", "img_dir", split)}/'
                  f'*.jpg + {osp.join(out, "seg", "ann_dir", split)}/*.png')
        print(f'  {osp.join(out, "meta.json")}')
    return dict(meta, counts=counts)


def main(argv=None) -> None:
    args = parse_args(argv)
    generate(
        args.out,
        args.seed,
        args.num_train,
        args.num_val,
        args.size,
        verbose=not args.quiet)


if __name__ == '__main__':
    sys.exit(main())
