# Copyright (c) mmcbn contributors. All rights reserved.
"""The --quick modes of benchmarks/soak.py and window_state_size.py."""
from script_utils import run_quick


def test_soak_quick_window_state_is_flat(tmp_path):
    data, _ = run_quick('soak.py', tmp_path / 'out')
    assert data['iterations'] == 24 and data['cbn_layers'] == 36
    # the ring buffers are allocated at the first record (burn-in records
    # only its last window - 1 iterations) and never grow
    assert data['window_bytes_changes_after_full'] == 0
    sizes = [r['window_bytes'] for r in data['records']]
    first = next(i for i, size in enumerate(sizes) if size)
    assert set(sizes[:first]) <= {0}
    assert len(set(sizes[first:])) == 1 and sizes[first] > 0


def test_window_state_size_quick(tmp_path):
    data, _ = run_quick('window_state_size.py', tmp_path / 'out')
    (row, ) = data['rows']
    assert row['window'] == 4 and row['cbn_layers'] > 0
    # about (window - 1) producer weights, plus small per-channel vectors
    assert row['producer_weights_x_entries_mb'] <= row['window_state_mb'] \
        <= 1.1 * row['producer_weights_x_entries_mb'] + 1
