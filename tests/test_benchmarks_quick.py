# Copyright (c) mmcbn contributors. All rights reserved.
"""The --quick modes of the statistics and accuracy benchmarks.

A quick run trains for a few iterations on a few images, so its accuracies
and errors are noise: for them these are smoke tests (the run finishes, the
JSON has its fields, numbers are finite). Each test also checks what a
quick run does determine, and could fail: cross-checks against an
independent computation, orderings that hold at any length, runs that must
be identical.
"""
import json
import math
import os
import os.path as osp
import subprocess
import sys

import pytest

from script_utils import ROOT, finite, run_quick

# installed by `make install` (requirements/tests.txt): the benchmarks use
# scikit-learn's bundled digits data set and matplotlib for plots
import matplotlib  # noqa: E402,F401
import sklearn  # noqa: E402,F401


ERRORS = ('naive_mean', 'naive_var', 'comp_mean', 'comp_var',
          'prodexact_var')


def test_stats_error_quick_smoke(tmp_path):
    """Smoke test of stats_error.py --quick; checks that can fail: the
    layers' numbers agree with a recomputation and a replay, compensation
    beats the naive window and is exact where the input is fixed."""
    data, stdout = run_quick('stats_error.py', tmp_path / 'out',
                             timeout=300)
    assert data['benchmark'] == 'stats_error'
    assert data['config']['quick'] is True
    for key in ('date', 'platform', 'torch', 'command'):
        assert key in data['machine']
    summary = data['summary']
    names = [t['name'] for t in data['trajectories']]
    assert len(names) == 2 and names[0] == 'lr 0.1'
    for name in names:
        by_lag = summary['by_lag'][name]
        assert set(by_lag) == {'early', 'after burn-in'}
        for regime in by_lag.values():
            assert sorted(int(k) for k in regime) == list(range(1, 8))
            for agg in regime.values():
                for c in ERRORS + ('ratio_mean', 'ratio_var'):
                    assert finite(agg[c]) and agg[c] >= 0, (c, agg)
        n_layers = data['config']['model']['norm_layers']
        assert len(summary['by_layer'][name]) == n_layers
        assert all(finite(v['comp_mean'])
                   for v in summary['by_layer'][name].values())
        assert summary['by_t'][name]
        assert finite(summary['weight_change'][name]['after_burnin'])
    for traj in data['trajectories']:
        # The numbers read from the mmcbn layers agree with an independent
        # recomputation, and replaying a batch reproduces what was recorded.
        assert traj['crosscheck_max_rel'] < 1e-3
        assert traj['lag0_check_max_rel'] < 1e-4
    # Compensation must beat the naive window on average at a realistic lr
    # after burn-in (for both statistics), and be exact for the mean of the
    # first layer, whose input does not depend on any parameter.
    main = summary['overall']['lr 0.1']['after burn-in']
    assert main['comp_mean'] < main['naive_mean']
    assert main['comp_var'] < main['naive_var']
    first = summary['by_layer']['lr 0.1']['0']
    assert first['comp_mean'] < 1e-3 * first['naive_mean']
    assert first['comp_var'] < first['naive_var']
    assert 'target' in data and set(data['target']) == set(names)
    assert '| lag 7 |' in stdout
    # The fast options, recorded along the same trajectory: they change
    # only d nu / dW, so their mean is exactly CBN's; bf16 storage moves
    # the variance by rounding only; sub-sampling does move it.
    assert set(data['config']['fast_options']) == {'s2', 'bf16', 's2+bf16'}
    for name in names:
        fast = summary['overall'][name]['after burn-in']
        for v in ('s2', 'bf16', 's2+bf16'):
            for c in ('mean', 'var', 'dev_mean', 'dev_var'):
                assert finite(fast[f'{v}_{c}']), (v, c)
            assert fast[f'{v}_dev_mean'] == 0
        assert 0 < fast['bf16_dev_var'] < 0.01
        assert fast['s2_dev_var'] > fast['bf16_dev_var']
    assert 'fast options' in stdout


def test_small_batch_quick_smoke(tmp_path):
    """Smoke test of small_batch.py --quick (accuracies after one epoch are
    noise); the check that can fail: ``running_stats_from='window'`` only
    changes the eval statistics, so those runs train exactly the weights of
    the default runs of the same seed."""
    data, stdout = run_quick('small_batch.py', tmp_path / 'out',
                             timeout=300)
    assert data['benchmark'] == 'small_batch'
    assert 'load_digits' in data['config']['dataset']
    summary = data['summary']
    expected = {f'BN b{b}' for b in (2, 4, 8, 16, 32)} | {
        'GN b2', 'GN b32', 'naive CBN b2 k8', 'naive CBN b4 k4',
        'CBN b2 k8', 'CBN b4 k4', 'CBN b2 k8 wrs', 'CBN b4 k4 wrs',
        "CBN authors' backward b2 k8", "CBN authors' backward b4 k4"}
    assert set(summary) == expected
    seeds = data['config']['seeds']
    assert len(seeds) >= 2
    for name, v in summary.items():
        assert len(v['accs']) == len(seeds)
        for key in ('acc_mean', 'acc_std', 'acc_pop_mean', 'lr', 'seconds'):
            assert finite(v[key]), (name, key)
        assert 0 <= v['acc_mean'] <= 100
        for r in data['runs'][name]:
            assert finite(r['train_loss_last_epoch'])
    # Same epochs for all: iterations scale inversely with the batch size,
    # and the learning rate linearly with it.
    n_train, epochs = data['config']['train_images'], data['config'][
        'epochs']
    for name, v in summary.items():
        assert v['iterations'] == (n_train // v['batch']) * epochs, name
    assert math.isclose(summary['BN b2']['lr'] * 16, summary['BN b32']['lr'])
    cbn = summary['CBN b2 k8']
    assert cbn['window'] == 8 and cbn['compensate'] is True
    assert 0 < cbn['burnin'] < cbn['iterations']
    assert summary['naive CBN b2 k8']['compensate'] is False
    assert summary['CBN b4 k4']['window'] == 4
    assert summary['CBN b4 k4']['running_stats_from'] == 'batch'
    assert summary['CBN b4 k4 wrs']['running_stats_from'] == 'window'
    assert 'wrs_b4_vs_cbn_b4' in data['checks']
    for c in data['checks'].values():
        assert finite(c['diff']) and finite(c['se'])
    # same weights: the same training losses, and the same accuracy once
    # the eval statistics are re-estimated on the training set
    for name in ('CBN b2 k8', 'CBN b4 k4'):
        default, window = data['runs'][name], data['runs'][name + ' wrs']
        assert [r['seed'] for r in default] == [r['seed'] for r in window]
        for a, b in zip(default, window):
            assert a['train_loss_last_epoch'] == b['train_loss_last_epoch']
            assert a['test_acc_population_stats'] == \
                b['test_acc_population_stats']
    assert 'CBN b2 k8' in stdout


def test_stats_error_det_quick_smoke(tmp_path):
    """Smoke test of stats_error_det.py --quick; checks that can fail: a
    replay reproduces the recorded statistics, compensation is exact for
    the stem and beats the naive window after burn-in."""
    data, stdout = run_quick('stats_error_det.py', tmp_path / 'out',
                             timeout=300)
    assert data['benchmark'] == 'stats_error_det'
    assert data['config']['quick'] is True
    # Replaying batch 0 at unchanged parameters (with its random state, so
    # the RPN/RoI samplers draw the same) reproduces what was recorded.
    assert data['lag0_check_max_rel'] < 1e-4
    names = data['layer_names']
    # CBN everywhere in the demo detector: backbone, FPN, box and mask heads
    groups = set(data['summary']['by_group'])
    assert {'backbone', 'neck', 'bbox_head', 'mask_head'} <= groups
    assert len(data['summary']['by_layer']) == len(names)
    for regime in data['summary']['by_lag'].values():
        assert sorted(int(k) for k in regime) == list(range(1, 8))
        for agg in regime.values():
            for c in ERRORS + ('ratio_mean', 'ratio_var'):
                assert finite(agg[c]) and agg[c] >= 0, (c, agg)
    # the first norm layer's producer (the stem conv) sees the raw image:
    # compensating its weight change makes the mean exact
    first = data['summary']['by_layer']['0']
    assert names[0].startswith('backbone')
    assert first['comp_mean'] < 1e-3 * first['naive_mean']
    late = data['summary']['overall']['after burn-in']
    assert late['comp_mean'] < late['naive_mean']
    assert set(data['target']) == {'min_ratio_mean', 'min_ratio_var', 'met'}
    assert '| lag 7 |' in stdout
    # the fast options along the same trajectory (see the classifier test)
    for v in ('s2', 'bf16', 's2+bf16'):
        assert late[f'{v}_dev_mean'] == 0
        assert finite(late[f'{v}_var']) and finite(late[f'{v}_dev_var'])
    assert 0 < late['bf16_dev_var'] < 0.01
    assert 'fast options' in stdout


def test_demo_tasks_quick_smoke(tmp_path):
    """Smoke test of demo_tasks.py --quick (6 iterations: metrics are
    noise); the check that can fail: the CBN-w run trains exactly the
    weights of the CBN run, and its running statistics differ."""
    env = dict(os.environ, MPLBACKEND='Agg')
    out, work = tmp_path / 'out', tmp_path / 'work'
    proc = subprocess.run(
        [sys.executable, osp.join(ROOT, 'benchmarks', 'demo_tasks.py'),
         '--quick', '--out', str(out), '--work-dir', str(work), '--norms',
         'bn', 'gn', 'mabn', 'cbn', 'cbnw', '--population'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / 'demo_tasks_quick.png').stat().st_size > 1000
    with open(out / 'demo_tasks_quick.json') as f:
        data = json.load(f)
    assert data['benchmark'] == 'demo_tasks'
    runs = data['runs']
    assert sorted(r['norm'] for r in runs) == ['bn', 'cbn', 'cbnw', 'gn',
                                               'mabn']
    for r in runs:
        assert r['task'] == 'seg' and r['seed'] == 0
        assert 0 <= r['metrics']['mIoU'] <= 100
        assert finite(r['train_seconds'])
        # each run trained its own config and left its checkpoint
        norm = 'cbn' if r['norm'] == 'cbnw' else r['norm']
        assert r['config'] == f'configs/demo/fcn_r18-d8_{norm}_demo.py'
        assert (work / f'seg_{r["norm"]}_seed0' / 'iter_6.pth').is_file()
    # CBN-w is the CBN config with window running statistics everywhere
    dumped = (work / 'seg_cbnw_seed0' / 'fcn_r18-d8_cbn_demo.py').read_text()
    assert dumped.count("running_stats_from='window'") == 3
    # ... and trains the same weights as CBN: every parameter of the final
    # checkpoints is equal, the running variances are not (after burn-in)
    import torch

    import mmcbn
    cbn, cbnw = (mmcbn.load_checkpoint_file(
        str(work / f'seg_{norm}_seed0' / 'iter_6.pth'))['state_dict']
        for norm in ('cbn', 'cbnw'))
    assert set(cbn) == set(cbnw)
    running = [k for k in cbn if k.endswith(('running_mean', 'running_var',
                                             'num_batches_tracked'))]
    assert len(running) == 3 * 26
    for key in set(cbn) - set(running):
        assert torch.equal(cbn[key], cbnw[key]), key
    assert sum(not torch.equal(cbn[k], cbnw[k]) for k in running
               if k.endswith('running_var')) == 26
    assert 'running_stats_from' not in (
        work / 'seg_cbn_seed0' / 'fcn_r18-d8_cbn_demo.py').read_text()
    assert set(data['summary']) == {'seg/bn', 'seg/gn', 'seg/cbn',
                                    'seg/cbnw', 'seg/mabn'}
    # MABN's checkpoint: MABN's buffers and a ConvWC marker per norm (every
    # conv with a norm is weight-centred), its running
    # means still 0 (MABN normalizes without a mean)
    mabn = mmcbn.load_checkpoint_file(
        str(work / 'seg_mabn_seed0' / 'iter_6.pth'))['state_dict']
    assert sum(k.endswith('.mabn_psi') for k in mabn) == 26
    assert sum(k.endswith('.weight_centred') for k in mabn) == 26
    assert all(not v.any() for k, v in mabn.items()
               if k.endswith('running_mean'))
    # --population: the BN/CBN/MABN checkpoints tested again with
    # statistics re-estimated on the 8 training images (GN has none)
    for r in runs:
        if r['norm'] in ('gn', 'cbnw'):
            assert 'population' not in r
            continue
        pop = r['population']
        assert pop['layers'] == 26 and pop['images'] == 8
        assert pop['checkpoint'].endswith(
            osp.join(f'seg_{r["norm"]}_seed0', 'iter_6.pth'))
        assert 0 <= pop['metrics']['mIoU'] <= 100
    assert 'population' in data['summary']['seg/cbn']
    assert 'Eval statistics re-estimated' in proc.stdout
    diffs = data['paired_differences']
    assert {'seg: mIoU (%) CBN - BN', 'seg: mIoU (%) CBN-w - CBN'} <= set(
        diffs)
    assert '| CBN |' in proc.stdout
    # a finished run is reused, not trained again
    again = subprocess.run(
        [sys.executable, osp.join(ROOT, 'benchmarks', 'demo_tasks.py'),
         '--quick', '--out', str(out), '--work-dir', str(work),
         '--norms', 'cbn'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'reusing' in again.stdout
    # --reuse: runs an earlier JSON has are taken from it (here CBN, in a
    # fresh work dir), the missing ones trained (naive CBN: the CBN config
    # with compensate=False in every part)
    work2, out2 = tmp_path / 'work2', tmp_path / 'out2'
    third = subprocess.run(
        [sys.executable, osp.join(ROOT, 'benchmarks', 'demo_tasks.py'),
         '--quick', '--out', str(out2), '--work-dir', str(work2),
         '--norms', 'cbn', 'cbnn', 'cbnuw', '--reuse',
         str(out / 'demo_tasks_quick.json')],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    with open(out2 / 'demo_tasks_quick.json') as f:
        data2 = json.load(f)
    assert data2['config']['reused_runs'] == ['seg_cbn_seed0']
    assert not (work2 / 'seg_cbn_seed0').exists()
    by_norm = {r['norm']: r for r in data2['runs']}
    cbn_first = next(r for r in runs if r['norm'] == 'cbn')
    assert by_norm['cbn']['metrics'] == cbn_first['metrics']
    assert by_norm['cbnn']['config'] == 'configs/demo/fcn_r18-d8_cbn_demo.py'
    dumped = (work2 / 'seg_cbnn_seed0' / 'fcn_r18-d8_cbn_demo.py').read_text()
    assert dumped.count('compensate=False') == 3
    assert 'seg: mIoU (%) CBN - naive CBN' in data2['paired_differences']
    # CBN-up-w: two options in every part
    dumped = (work2 / 'seg_cbnuw_seed0' / 'fcn_r18-d8_cbn_demo.py').read_text()
    assert dumped.count("compensate='upstream'") == 3
    assert dumped.count("running_stats_from='window'") == 3
    # --finished-only trains nothing: GN (neither finished nor in the JSON)
    # is left out
    fourth = subprocess.run(
        [sys.executable, osp.join(ROOT, 'benchmarks', 'demo_tasks.py'),
         '--quick', '--out', str(out2), '--work-dir', str(work2),
         '--norms', 'gn', 'cbn', 'cbnn', '--finished-only'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert '[seg_gn_seed0] not run' in fourth.stdout
    with open(out2 / 'demo_tasks_quick.json') as f:
        assert sorted(r['norm'] for r in json.load(f)['runs']) == ['cbnn']
    # an earlier JSON of other data or another mode is refused
    refused = subprocess.run(
        [sys.executable, osp.join(ROOT, 'benchmarks', 'demo_tasks.py'),
         '--quick', '--out', str(out2), '--work-dir', str(work2),
         '--norms', 'cbn', '--data-seed', '1', '--reuse',
         str(out / 'demo_tasks_quick.json')],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and '--reuse' in refused.stderr
