# Copyright (c) mmcbn contributors. All rights reserved.
"""benchmarks/sync_cbn.py --quick: 2 gloo processes, one thread each.

Its timings are noise (a smoke test for them). What the quick run does
determine, and what is checked here: the SyncBN baseline trains exactly
as SyncCBN(window=1); every collective call of a training step has the
size of the formula; pooled norms normalize with identical statistics on
both processes; and the statistics SyncCBN normalizes with are closer to
the population statistics than those of BN, SyncBN or CBN.
"""
import math

from script_utils import run_quick

import matplotlib  # noqa: E402,F401 (the benchmark plots)
import sklearn  # noqa: E402,F401 (its bundled digits data set)


def test_sync_cbn_quick(tmp_path):
    data, _ = run_quick('sync_cbn.py', tmp_path / 'out')
    assert data['machine']['processes'] == 2
    assert data['machine']['torch_threads'] == 1
    assert len(data['machine']['loadavg_start']) == 3

    # torch's SyncBatchNorm on the CPU: recorded either way
    tn = data['torch_syncbn_on_cpu']
    assert tn['runs'] or 'SyncBatchNorm' in tn['error']

    # the CPU SyncBN baseline is SyncBN: float64 trajectory equal to
    # SyncCBN(window=1)'s, on both processes
    for check in data['baseline_check']:
        assert check['steps'] >= 3
        assert check['max_abs_loss_diff'] <= 1e-9, check
        assert check['max_abs_state_diff'] <= 1e-9, check

    # bytes: every call of a step has the formula's size, recomputed here
    # from the layers' channel counts
    assert data['bytes_equal_on_both_processes']
    for name, b in data['bytes'].items():
        channels = b['channels']
        assert len(channels) == 20
        assert b['same_calls_every_step'], name
        assert b['matches_formula'], name
        # DDP all-reduces every gradient once, through the hook
        assert b['ddp_bytes_per_step'] == b['parameter_bytes'], name
        if name in ('BN', 'CBN w4'):
            assert b['calls'] == [], name
            continue
        backward = [c[2] for c in b['calls'] if c[1] == 'backward']
        assert backward == [2 * c for c in reversed(channels)], name
        forward = [c[2] for c in b['calls'] if c[1] == 'forward']
        if name == 'SyncBN':
            assert forward == [2 * (2 * c + 1) for c in channels]
            assert {c[0] for c in b['calls'] if c[1] == 'forward'} == {
                'all_gather'}
        else:
            window = int(name.split('w')[-1])
            assert forward == [window * (1 + 2 * c) for c in channels]
        assert b['bytes_per_step'] == 4 * (sum(forward) + sum(backward))

    # speed: a smoke test (a quick run's timings are noise)
    rows = {r['norm']: r for r in data['speed']}
    assert set(rows) == {'BN', 'SyncBN', 'SyncCBN w1', 'CBN w4',
                         'SyncCBN w4', 'CBN w8', 'SyncCBN w8'}
    assert all(r['step_ms'] > 0 and r['cpu_ms'] > 0 and r['reps'] >= 3
               for r in rows.values())
    assert rows['BN']['vs_bn'] == rows['BN']['cpu_vs_bn'] == 1.0
    assert set(data['all_reduce_ms']) == {'1026', '513', '2052', '4104'}

    # statistics: pooled norms use identical statistics on both processes,
    # per-process ones do not; pooling both axes gives the smallest error
    stats = {r['norm']: r for r in data['stats']}
    for name, r in stats.items():
        assert math.isfinite(r['mean_error']) and r['mean_error'] > 0
        assert math.isfinite(r['var_error']) and r['var_error'] > 0
        pooled = name.startswith('Sync')
        assert r['same_stats_on_both_processes'] == pooled, name
    assert [stats[n]['images'] for n in ('BN', 'SyncBN', 'CBN w4',
                                         'CBN w8', 'SyncCBN w4')] == [
                                             2, 4, 8, 16, 16]
    best = stats['SyncCBN w4']
    for name in ('BN', 'SyncBN', 'CBN w4', 'CBN w8'):
        assert best['mean_error'] < stats[name]['mean_error'], name
        assert best['var_error'] < stats[name]['var_error'], name
    assert stats['SyncBN']['mean_error'] < stats['BN']['mean_error']
    assert stats['SyncBN']['var_error'] < stats['BN']['var_error']
