# Copyright (c) mmcbn contributors. All rights reserved.
"""The --quick modes of benchmarks/soak.py and window_state_size.py."""
import json
import os
import os.path as osp
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run_quick(script, tmp_path):
    out = tmp_path / 'out'
    env = dict(os.environ, OMP_NUM_THREADS='1', MPLBACKEND='Agg')
    proc = subprocess.run(
        [sys.executable, osp.join(ROOT, 'benchmarks', script), '--quick',
         '--out', str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stem = script[:-3] + '_quick'
    assert (out / f'{stem}.png').stat().st_size > 1000
    with open(out / f'{stem}.json') as f:
        return json.load(f)


def test_soak_quick_window_state_is_flat(tmp_path):
    data = run_quick('soak.py', tmp_path)
    assert data['iterations'] == 24 and data['cbn_layers'] == 36
    # the ring buffers are allocated at the first record and never grow
    assert data['window_bytes_changes_after_full'] == 0
    sizes = {r['window_bytes'] for r in data['records']}
    assert len(sizes) == 1 and sizes.pop() > 0


def test_window_state_size_quick(tmp_path):
    data = run_quick('window_state_size.py', tmp_path)
    (row, ) = data['rows']
    assert row['window'] == 4 and row['cbn_layers'] > 0
    # about (window - 1) producer weights, plus small per-channel vectors
    assert row['producer_weights_x_entries_mb'] <= row['window_state_mb'] \
        <= 1.1 * row['producer_weights_x_entries_mb'] + 1
