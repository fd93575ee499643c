# Copyright (c) mmcbn contributors. All rights reserved.
"""``tools/upstream_coverage.py`` on shipped configs: what the upstream
compensation follows in the stock models (every path the math allows)."""
import os.path as osp
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))


@pytest.mark.parametrize('config,expected', [
    # the PSP head: adaptive pooling (one of them a global mean), bilinear
    # upsampling, the concatenation before the bottleneck
    ('configs/pspnet/pspnet_r50-d8_cbn_4xb2-80k_ade20k-512x512.py', {}),
    # the head reads the FPN outputs, whose convs have no norm here: the
    # paper's truncation, not an upstream norm
    ('configs/retinanet/retinanet_r50_fpn_cbn-head_1x_coco.py',
     {'ConvolutionBackward0 (no norm between two producers)': 10}),
])
def test_shipped_config_coverage(config, expected):
    pytest.importorskip('mmdet')
    pytest.importorskip('mmseg')
    import upstream_coverage
    coverage, line = upstream_coverage.coverage_of(osp.join(ROOT, config))
    assert coverage['fallbacks'] == expected, line
    assert coverage['followed'] > coverage['fed'] > 0
    assert ('no path falls back' in line) == (not expected)
