# Copyright (c) mmcbn contributors. All rights reserved.
"""The speed benchmarks' --quick modes.

A quick run times tiny models once or twice, so its timings mean nothing:
for them these are smoke tests (every code path runs, the JSON has its
fields). Each test also checks facts that do not depend on timing and
could fail: memory accounting, the fused floor's agreement with the
separate computation, the exported model's outputs.
"""
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


def test_train_speed_quick_smoke(tmp_path):
    """Smoke test of train_speed.py --quick; non-timing checks: window
    state per stored entry, its growth with the window, the fused floor."""
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
    # the window state is window - 1 entries of the same size per layer
    w2 = rows['CBN w2']['window_state_mb']
    assert w2 > 0
    for k in (4, 8, 16):
        assert rows[f'CBN w{k}']['window_state_mb'] == pytest.approx(
            (k - 1) * w2, rel=1e-3), k
    assert result['summary']['floor_products'] == 20  # ResNet-18 convs
    assert [r['norm'] for r in result['detector']] == ['BN', 'GN', 'CBN']
    assert 'efficiency at w8' in stdout
    fusion = result['summary']['fusion']
    # one weight-gradient call over [grad, 2x/m] gives both gradients
    assert fusion['fused_max_rel_diff'] < 1e-4
    assert all(fusion[k] > 0 for k in ('regular_ms', 'separate_ms',
                                       'fused_ms'))
    assert 'fused weight-gradient call' in stdout


def test_inference_speed_quick_smoke(tmp_path):
    """Smoke test of inference_speed.py --quick; the check that can fail:
    the exported (BN) model's raw outputs equal the CBN model's in eval
    mode, for norm layers with non-trivial statistics."""
    run_quick('inference_speed.py', tmp_path)
    with open(tmp_path / 'inference_speed_quick.json') as f:
        result = json.load(f)
    rows = result['rows']
    models = ('Faster R-CNN R50-FPN', 'PSPNet R50-D8')
    assert {(r['model'], r['norm']) for r in rows} == {
        (m, n) for m in models for n in ('CBN', 'BN', 'GN', 'exported')}
    assert all(r['forward_ms'] > 0 for r in rows)
    checks = result['exported_vs_cbn']
    assert set(checks) == set(models)
    for name, check in checks.items():
        assert check['values'] > 1000, (name, check)
        assert check['max_abs_diff'] <= 1e-5, (name, check)
