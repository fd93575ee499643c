# Copyright (c) mmcbn contributors. All rights reserved.
"""A plain ResNet-18/50 for the speed benchmarks where mmdet is missing.

``train_speed.py`` times mmdet's ResNet, the backbone users train. A GPU
machine lent for a short check has PyTorch but no mmcv build for its CUDA
(compiling one takes longer than the loan), so mmdet's models cannot be
imported there. This module is the same architecture (v1.5: the stride in
the 3x3 convolution, a projection shortcut with its own norm) written out,
with the norm built from an mmengine-style ``norm_cfg``, so that BN and CBN
step times can still be compared on one machine. Its numbers are comparable
with each other, not with mmdet's ResNet to the microsecond.
"""
from typing import Dict

from torch import Tensor, nn

#: depth -> (block, blocks per stage)
ARCH = {18: ('basic', (2, 2, 2, 2)), 50: ('bottleneck', (3, 4, 6, 3))}


def build_norm(norm_cfg: Dict, channels: int) -> nn.Module:
    """``BN`` and ``GN`` as mmcv names them; any other type (``CBN``, ...)
    from mmengine's ``MODELS`` registry (importing mmcbn registers CBN)."""
    cfg = dict(norm_cfg)
    kind = cfg.pop('type')
    cfg.pop('requires_grad', None)
    if kind == 'BN':
        return nn.BatchNorm2d(channels, **cfg)
    if kind == 'GN':
        return nn.GroupNorm(num_channels=channels, **cfg)
    from mmengine.registry import MODELS
    return MODELS.build(dict(type=kind, num_features=channels, **cfg))


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)


class _Block(nn.Module):

    def __init__(self, kind: str, cin: int, width: int, stride: int,
                 norm_cfg: Dict):
        super().__init__()
        expansion = 4 if kind == 'bottleneck' else 1
        cout = width * expansion
        if kind == 'bottleneck':
            shapes = [(cin, width, 1, 1), (width, width, 3, stride),
                      (width, cout, 1, 1)]
        else:
            shapes = [(cin, width, 3, stride), (width, cout, 3, 1)]
        layers = []
        for i, (a, b, k, s) in enumerate(shapes):
            layers += [_conv(a, b, k, s), build_norm(norm_cfg, b)]
            if i < len(shapes) - 1:
                layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(
            _conv(cin, cout, 1, stride), build_norm(norm_cfg, cout)) \
            if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.out_channels = cout

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class PlainResNet(nn.Module):
    """ResNet-``depth`` (18 or 50) up to its last stage, as mmdet's
    ``ResNet(depth, out_indices=(3, ))`` returns it: a tuple of one map.

    Args:
        depth (int): 18 or 50.
        norm_cfg (dict): The norm of every layer, e.g. ``dict(type='BN')``.
    """

    def __init__(self, depth: int, norm_cfg: Dict):
        super().__init__()
        if depth not in ARCH:
            raise ValueError(f'depth must be one of {sorted(ARCH)}, got '
                             f'{depth!r}')
        kind, counts = ARCH[depth]
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), build_norm(norm_cfg, 64),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for stage, count in enumerate(counts):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                block = _Block(kind, cin, 64 * 2**stage, stride, norm_cfg)
                blocks.append(block)
                cin = block.out_channels
        self.stages = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> tuple:
        return (self.stages(self.stem(x)), )
