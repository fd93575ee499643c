# Copyright (c) mmcbn contributors. All rights reserved.
"""The --quick mode of benchmarks/small_batch_photos.py (the small-batch
study on crops of bundled photographs)."""
import json
import math
import os
import os.path as osp
import sys

import pytest

from script_utils import ROOT, finite, run_quick

# installed by `make install` (requirements/tests.txt): the photographs
# come from scikit-image's, scikit-learn's and matplotlib's bundled data
import matplotlib  # noqa: E402,F401
import skimage  # noqa: E402,F401
import sklearn  # noqa: E402,F401


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    # a fresh work dir: every run is trained, none reused from earlier ones
    return run_quick('small_batch_photos.py', tmp_path_factory.mktemp('out'),
                     '--work-dir', str(tmp_path_factory.mktemp('work')),
                     timeout=600)


def test_photo_regions_data():
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    from small_batch_photos import load_photo_regions, source_photos

    photos = source_photos()
    assert len(photos) == 21
    assert all(a.ndim == 3 and a.shape[2] == 3 and min(a.shape[:2]) >= 64
               for _, a in photos)
    x_tr, y_tr, x_te, y_te, names = load_photo_regions(
        n_train=5, n_test=3, n_photos=3)
    assert names == [n for n, _ in photos[:3]]
    assert x_tr.shape == (3 * 4 * 5, 3, 16, 16)
    assert x_te.shape == (3 * 4 * 3, 3, 16, 16)
    assert sorted(set(y_tr.tolist())) == list(range(12))
    assert (y_tr.bincount() == 5).all() and (y_te.bincount() == 3).all()
    # standardized with the training statistics, per channel
    assert x_tr.mean((0, 2, 3)).abs().max() < 1e-4
    assert (x_tr.std((0, 2, 3)) - 1).abs().max() < 1e-4
    # train and test crops of a region come from different positions
    for c in range(12):
        a, b = x_tr[y_tr == c], x_te[y_te == c]
        assert (a[:, None] - b[None]).flatten(2).abs().amax(2).min() > 0
    # seeded: the same data twice, other data with another seed
    again = load_photo_regions(n_train=5, n_test=3, n_photos=3)
    assert (again[0] == x_tr).all()
    other = load_photo_regions(data_seed=1, n_train=5, n_test=3, n_photos=3)
    assert not (other[0] == x_tr).all()


def test_small_batch_photos_quick(quick_run):
    data, stdout = quick_run
    assert data['benchmark'] == 'small_batch_photos'
    assert data['config']['quick'] is True
    summary, runs = data['summary'], data['runs']
    cbn_runs = ('naive CBN', "CBN authors' backward", 'CBN', 'CBN-w',
                'naive + window grad', 'BN early, CBN late')
    expected = {f'BN b{b}' for b in (2, 4, 8, 32)} | {
        'GN b2', 'GN b4', 'GN b32', 'digits BN b2', 'digits BN b32',
        'digits CBN b2 k8', 'digits CBN-up b2 k8', 'digits CBN-up-w b2 k8',
        'digits GN b2', 'digits GN+WS b2', 'digits GN+WC b2',
        'digits MABN b2', 'digits CBN+WS b2 k8', 'digits CBN-up-w+WS b2 k8',
        'CBN b2 k8 all burn-in'} | {
            f'{run} {tag}' for run in cbn_runs
            for tag in ('b2 k8', 'b4 k4')}
    assert set(summary) == expected
    seeds = data['config']['seeds']
    assert len(seeds) == 2
    for name, v in summary.items():
        assert len(v['accs']) == len(seeds)
        for key in ('acc_mean', 'acc_std', 'acc_pop_mean', 'lr',
                    'train_loss_last_epoch', 'train_loss_last_tenth',
                    'stem_norm_end', 'conv_norm_end'):
            assert finite(v[key]), (name, key)
        # init + every tenth (every iteration in a run of < 10)
        tenth = max(v['iterations'] // 10, 1)
        assert len(v['stem_norm_curve']) == 1 + v['iterations'] // tenth
        assert 0 <= v['acc_mean'] <= 100
        # same epochs for every run, lr scaled linearly with the batch
        n_train = data['config']['train_images'][v['data']]
        assert v['iterations'] == (n_train // v['batch']) * data[
            'config']['epochs'], name
        assert math.isclose(v['lr'], 0.1 * v['batch'] / 32)
    assert summary['CBN b2 k8']['burnin'] == round(
        0.25 * summary['CBN b2 k8']['iterations'])
    assert summary['BN early, CBN late b2 k8']['burnin'] == round(
        0.5 * summary['CBN b2 k8']['iterations'])
    assert summary['naive CBN b2 k8']['compensate'] is False
    assert summary['CBN-w b2 k8']['running_stats_from'] == 'window'
    # the backward rules: the library default, the authors', the control
    assert summary['CBN b2 k8']['window_grad'] is True
    assert summary["CBN authors' backward b2 k8"]['window_grad'] is False
    assert summary['naive CBN b2 k8']['window_grad'] is False
    control = summary['naive + window grad b2 k8']
    assert control['window_grad'] is True and control['compensate'] is False
    assert finite(summary['CBN b2 k8']['stem_norm_burnin'])
    assert data['config']['classes'] == {'photos': 40, 'digits': 10}

    # Cross-check 1: a burn-in as long as the schedule is BN throughout,
    # and the seeds are paired across norms (same initialization, data
    # order and flips), so this run repeats 'BN b2'.
    tol = 100.0 / data['config']['test_images']['photos']  # one image
    for a, b in zip(runs['CBN b2 k8 all burn-in'], runs['BN b2']):
        assert a['loss_curve'] == pytest.approx(b['loss_curve'], rel=1e-4)
        assert abs(a['test_acc'] - b['test_acc']) <= tol
    # Cross-check 2: running_stats_from='window' changes the eval
    # statistics only, so CBN-w trains CBN's weights: same losses, and the
    # same accuracy once both get the training set's statistics.
    for a, b in zip(runs['CBN-w b2 k8'], runs['CBN b2 k8']):
        assert a['loss_curve'] == pytest.approx(b['loss_curve'], rel=1e-6)
        assert a['test_acc_population_stats'] == pytest.approx(
            b['test_acc_population_stats'])
    # ... while the late switch to CBN does change the training, and so
    # does the backward rule
    late, cbn = runs['BN early, CBN late b2 k8'], runs['CBN b2 k8']
    assert any(a['loss_curve'] != b['loss_curve'] for a, b in zip(late, cbn))
    authors = runs["CBN authors' backward b2 k8"]
    assert any(a['loss_curve'] != b['loss_curve']
               for a, b in zip(authors, cbn))
    assert "CBN b2 k8 - CBN authors' backward b2 k8" in data['checks']

    # paired differences: every run against BN at its batch, per seed
    checks = data['checks']
    c = checks['CBN b2 k8 - BN b2']
    d = [x - y for x, y in zip(summary['CBN b2 k8']['accs'],
                               summary['BN b2']['accs'])]
    assert c['per_seed'] == pytest.approx(d)
    assert c['diff'] == pytest.approx(sum(d) / len(d))
    assert c['seeds_a_better'] == sum(x > 0 for x in d)
    assert 'digits BN b2 - digits BN b32' in checks
    assert 'GN b2 - BN b2' in checks

    # Why photos and not digits: image-to-image heterogeneity makes the
    # statistics of 2 images noisier; averaging 16 images reduces it.
    noise = data['noise']
    photos, digits = noise['photos'], noise['digits']
    assert photos['batch 2']['all']['between_image'] > \
        2 * digits['batch 2']['all']['between_image']
    assert photos['batch 2']['all']['mean_noise'] > \
        digits['batch 2']['all']['mean_noise']
    for n in (photos, digits):
        for key in ('mean_noise', 'var_noise'):
            assert n['batch 16']['all'][key] < n['batch 2']['all'][key]
    assert '| CBN b2 k8 |' in stdout and 'between-image' in stdout
    assert 'reused' not in stdout


def test_small_batch_photos_resume(tmp_path):
    """Finished runs are kept in the work dir and taken from there when the
    same settings run again; other settings train afresh."""

    def run(*extra):
        return run_quick('small_batch_photos.py', tmp_path, '--work-dir',
                         str(tmp_path / 'work'), '--runs', 'BN b4', 'GN b2',
                         *extra, timeout=300)

    first, out1 = run()
    assert 'reused' not in out1
    again, out2 = run()
    assert out2.count('reused from') == 4  # 2 runs x 2 seeds
    assert again['summary']['GN b2']['accs'] == first['summary']['GN b2'][
        'accs']
    _, out3 = run('--base-lr', '0.2')
    assert 'reused' not in out3


def test_upstream_study_quick(tmp_path):
    """upstream_study.py --quick: every method tuned on the validation
    split and run on the test split at its chosen learning rate; the
    validation split is carved out of the training crops."""
    import subprocess
    import sys
    env = dict(os.environ, MPLBACKEND='Agg', OMP_NUM_THREADS='1')
    out, work = tmp_path / 'out', tmp_path / 'work'
    proc = subprocess.run(
        [sys.executable, osp.join(ROOT, 'benchmarks', 'upstream_study.py'),
         '--quick', '--out', str(out), '--work-dir', str(work)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / 'upstream_study_quick.json') as f:
        data = json.load(f)
    names = ['BN b2', 'BN b32', 'GN b2', 'CBN b2', 'CBN-w b2', 'CBN-up b2',
             'CBN-up-w b2', 'ceiling b2']
    assert list(data['summary']) == names
    for name in names:
        scores = data['tuning'][name]
        assert set(scores) == {'0.1', '0.4'}
        # the chosen learning rate is the best on validation
        assert data['chosen'][name] == max(
            (float(lr) for lr in scores), key=lambda lr: scores[str(lr)])
        assert data['summary'][name]['base_lr'] == data['chosen'][name]
    lines = [json.loads(x) for x in open(work / 'runs.jsonl')]
    assert len(lines) == 2 * len(names) + len(names)
    assert {x['split'] for x in lines} == {'val', 'test'}
    assert 'CBN-up b2 - GN b2' in data['checks']
    assert (out / 'upstream_study_quick.png').stat().st_size > 1000
    # a second run reuses every finished run
    again = subprocess.run(
        [sys.executable, osp.join(ROOT, 'benchmarks', 'upstream_study.py'),
         '--quick', '--out', str(out), '--work-dir', str(work)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert len(open(work / 'runs.jsonl').readlines()) == len(lines)


def _quick_study(name, tmp_path, methods):
    """Run ``benchmarks/<name>.py --quick`` on ``methods``; its JSON, out
    and work dirs."""
    import subprocess
    env = dict(os.environ, MPLBACKEND='Agg', OMP_NUM_THREADS='1')
    out, work = tmp_path / 'out', tmp_path / 'work'
    proc = subprocess.run(
        [sys.executable, osp.join(ROOT, 'benchmarks', f'{name}.py'),
         '--quick', '--out', str(out), '--work-dir', str(work),
         '--methods'] + methods,
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / f'{name}_quick.json') as f:
        return json.load(f), out, work


def test_batch2_study_quick(tmp_path):
    """batch2_study.py --quick on some of its rows: each method tuned on
    the validation split, run with its own layers (WS/WC convolutions,
    MABN, the probe), scored also with re-estimated statistics, and the
    paired comparisons against the strongest peer."""
    names = ['BN b2', 'GN b2', 'GN+WS b2', 'MABN b2', 'CBN+WC b2',
             'ceiling+WS b2', 'SMA-BN uncentred+WC b2']
    data, out, _ = _quick_study('batch2_study', tmp_path, names)
    assert list(data['summary']) == names
    layers = {n: set(data['runs'][n][0]['layer_types']) for n in names}
    assert layers['GN+WS b2'] == {'ConvWS2d', 'GroupNorm'}
    assert layers['MABN b2'] == {'ConvWC', 'MABN2d'}
    assert layers['CBN+WC b2'] == {'ConvWC', 'CBN2d'}
    assert layers['ceiling+WS b2'] == {'ConvWS2d', 'BatchNorm2d'}
    assert layers['SMA-BN uncentred+WC b2'] == {'ConvWC', 'SMASecondMoment2d'}
    assert layers['BN b2'] == {'Conv2d', 'BatchNorm2d'}
    for name in names:
        scores = data['tuning'][name]
        assert data['chosen'][name] == max(
            (float(lr) for lr in scores), key=lambda lr: scores[str(lr)])
        v = data['summary'][name]
        assert finite(v['acc_pop_mean']) and finite(v['acc_precise_mean'])
        if name.startswith('GN'):  # nothing to re-estimate
            assert v['accs_pop'] == v['accs'] == v['accs_precise']
    # the strongest peer is named in the re-estimated comparisons
    peers = ('GN b2', 'GN+WS b2', 'MABN b2')
    best = max(peers, key=lambda p: data['summary'][p]['acc_mean'])
    assert f'CBN+WC b2 (re-estimated) - {best} (re-estimated)' in \
        data['checks']
    c = data['checks']['MABN b2 - GN b2']
    assert c['per_seed'] == [a - b for a, b in zip(
        data['summary']['MABN b2']['accs'], data['summary']['GN b2']['accs'])]
    assert (out / 'batch2_study_quick.png').stat().st_size > 1000


def test_upstream_levers_quick(tmp_path):
    """upstream_levers.py --quick: the lever rows run untuned at the given
    rate with their own options (no tuning runs), the tuned rows are
    tuned, and each row is compared with CBN-w and the exact form."""
    names = ['CBN-w b2', 'CBN-up-w b2', 'CBN-up-w fast b2', 'CBN-up-w mean b2']
    data, _, work = _quick_study('upstream_levers', tmp_path, names)
    assert list(data['summary']) == names
    runs = [json.loads(line) for line in open(work / 'runs.jsonl')]
    val = {r['name'] for r in runs if r['split'] == 'val'}
    assert val == {'CBN-w b2', 'CBN-up-w b2'}  # the levers are not tuned
    assert data['chosen']['CBN-up-w fast b2'] == 0.1
    forms = {m['name']: m['kwargs'].get('upstream_form')
             for m in data['methods']}
    assert forms['CBN-up-w b2'] == 'exact'
    assert forms['CBN-up-w fast b2'] == 'fast'
    assert forms['CBN-up-w mean b2'] == 'mean'
    assert 'CBN-up-w fast b2 - CBN-w b2' in data['checks']
    assert 'CBN-up-w fast b2 - CBN-up-w b2' in data['checks']


def test_upstream_error_quick(tmp_path):
    """upstream_error.py --quick: the shadow fast records are compared
    with the exact terms at every use, per layer; the fast mean term is
    close to the matrices' (they differ by W_t - W_tau only), the fast
    variance term is not the exact one but closer than none."""
    import subprocess
    import sys
    env = dict(os.environ, MPLBACKEND='Agg', OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, osp.join(ROOT, 'benchmarks', 'upstream_error.py'),
         '--quick', '--out', str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / 'upstream_error_quick.json') as f:
        data = json.load(f)
    total = data['errors']['all layers']
    layers = [k for k in data['errors'] if k != 'all layers']
    assert len(layers) >= 4 and total['uses'] == sum(
        data['errors'][k]['uses'] for k in layers) > 0
    assert 0 <= total['mean, vectors'] < 0.2
    assert 0 < total['variance, calibrated diagonal'] < 1.0
