# Copyright (c) mmcbn contributors. All rights reserved.
"""The speed benchmarks' --quick modes run and report sane numbers."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run_quick(script, out):
    proc = subprocess.run(
        [sys.executable, osp.join(ROOT, 'benchmarks', script), '--quick',
         '--out', str(out)], capture_output=True, text=True, timeout=900,
        env=dict(os.environ, OMP_WAIT_POLICY='PASSIVE'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_train_speed_quick(tmp_path):
    stdout = run_quick('train_speed.py', tmp_path)
    with open(tmp_path / 'train_speed_quick.json') as f:
        result = json.load(f)
    assert (tmp_path / 'train_speed_quick.png').stat().st_size > 0
    norms = [r['norm'] for r in result['resnet']]
    assert norms == ['BN', 'GN', 'CBN w1', 'CBN w2', 'CBN w4', 'CBN w8',
                     'CBN w16', 'authors w8']
    rows = {r['norm']: r for r in result['resnet']}
    assert all(r['step_ms'] > 0 for r in rows.values())
    # exact, load-independent facts: state per stored iteration
    assert 1.0 <= rows['CBN w8']['window_state_per_weight'] <= 1.05
    assert rows['authors w8']['window_state_per_weight'] >= 2.99
    assert rows['CBN w1']['window_state_mb'] == 0
    assert rows['CBN w8']['peak_mb'] > 0
    assert result['summary']['floor_products'] == 20  # ResNet-18 convs
    assert [r['norm'] for r in result['detector']] == ['BN', 'GN', 'CBN']
    assert 'efficiency at w8' in stdout
    fusion = result['summary']['fusion']
    # one weight-gradient call over [grad, 2x/m] gives both gradients
    assert fusion['fused_max_rel_diff'] < 1e-4
    assert all(fusion[k] > 0 for k in ('regular_ms', 'separate_ms',
                                       'fused_ms'))
    assert 'fused weight-gradient call' in stdout


def test_inference_speed_quick(tmp_path):
    run_quick('inference_speed.py', tmp_path)
    with open(tmp_path / 'inference_speed_quick.json') as f:
        rows = json.load(f)['rows']
    assert {(r['model'], r['norm']) for r in rows} == {
        (m, n) for m in ('Faster R-CNN R50-FPN', 'PSPNet R50-D8')
        for n in ('CBN', 'BN', 'GN', 'exported')}
    assert all(r['forward_ms'] > 0 for r in rows)
