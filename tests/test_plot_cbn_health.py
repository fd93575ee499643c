# Copyright (c) mmcbn contributors. All rights reserved.
"""tools/plot_cbn_health.py on a tiny json log written here."""
import json
import os.path as osp
import subprocess
import sys

import pytest

from mmcbn.health import METRICS

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools'))

import plot_cbn_health  # noqa: E402

GROUPS = ('backbone', 'head')


def log_line(step, fill, scale, extra=()):
    """A train line as mmengine writes it, with CBNHook's keys."""
    line = dict(
        lr=0.01, loss=1.0 / step, cbn_bound=3, cbn_frozen=1, cbn_unbound=0)
    for metric in METRICS:
        value = fill if metric == 'window_fill' else scale * step
        line[f'cbn_{metric}'] = value
        for index, group in enumerate(GROUPS):
            line[f'cbn_{metric}_{group}'] = value + index
    line.update(extra)
    line.update(epoch=1, iter=step, step=step)
    return line


@pytest.fixture
def work_dir(tmp_path):
    """A work dir whose run logged burn-in (steps 10, 20: fill 0, metrics
    0), then full windows (30, 40), with a validation line between."""
    vis = tmp_path / '20261125_120000' / 'vis_data'
    vis.mkdir(parents=True)
    lines = [
        log_line(10, 0.0, 0.0),
        log_line(20, 0.0, 0.0),
        {
            'coco/bbox_mAP': 0.25,
            'step': 2
        },  # validation: no cbn_ key
        log_line(30, 1.0, 0.01),
        log_line(40, 1.0, 0.01),
    ]
    with open(vis / 'scalars.json', 'w') as f:
        for line in lines:
            f.write(json.dumps(line) + '\n')
    return tmp_path


def test_metric_names_match_mmcbn():
    assert plot_cbn_health.METRICS == tuple(METRICS)


def test_split_key():
    split = plot_cbn_health.split_key
    assert split('cbn_comp_nu') == ('comp_nu', '')
    assert split('cbn_batch_vs_window_mean_neck') == ('batch_vs_window_mean',
                                                      'neck')
    assert split('cbn_comp_mean_roi_head') == ('comp_mean', 'roi_head')
    assert split('cbn_bound') == ('bound', '')
    assert split('loss_cls') is None and split('cbn_other') is None


def test_load_and_plot(work_dir):
    path = plot_cbn_health.find_log(str(work_dir))
    assert path.endswith(osp.join('vis_data', 'scalars.json'))
    series = plot_cbn_health.load_cbn_scalars(path)
    # 6 metrics x (model + 2 groups) + 3 counts; the validation line and
    # the other keys are left out
    assert len(series) == 6 * 3 + 3
    assert series[('window_fill', '')] == ([10, 20, 30, 40], [0, 0, 1, 1])
    assert series[('comp_mean', 'head')] == ([10, 20, 30, 40],
                                             pytest.approx([1, 1, 1.3, 1.4]))
    assert plot_cbn_health.burnin_end(series) == 30
    fig = plot_cbn_health.plot(series, 'tiny')
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [
        'window fill\nwindow_fill', 'entries repaired\nrepaired_frac',
        'compensation size\ncomp_mean (solid), comp_nu (dashed)',
        'batch vs window\nbatch_vs_window_mean (solid), '
        'batch_vs_window_var (dashed)'
    ]
    assert [t.get_text() for t in fig.legends[0].get_texts()
            ] == ['model', 'backbone', 'head']
    # model-wide line first, then one per group; two metrics in the
    # compensation and batch-vs-window panels
    assert [len(ax.get_lines())
            for ax in axes] == [3 + 1, 3 + 1, 6 + 1,
                                6 + 1]  # + the burn-in marker
    steps, values = axes[2].get_lines()[0].get_data()
    assert list(steps) == [10, 20, 30, 40]
    assert list(values) == pytest.approx([0, 0, 0.3, 0.4])
    assert 'layers: 3 bound, 1 frozen, 0 unbound' in fig._suptitle.get_text()


def test_command_line_writes_the_png(work_dir, tmp_path):
    out = tmp_path / 'health.png'
    proc = subprocess.run([
        sys.executable,
        osp.join(REPO, 'tools', 'plot_cbn_health.py'),
        str(work_dir), '--out',
        str(out)
    ],
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 20000
    # a log without CBN keys: a clear error
    plain = tmp_path / 'plain.json'
    plain.write_text(json.dumps(dict(loss=1.0, step=1)) + '\n')
    proc = subprocess.run([
        sys.executable,
        osp.join(REPO, 'tools', 'plot_cbn_health.py'),
        str(plain), '--out',
        str(tmp_path / 'plain.png')
    ],
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode != 0 and 'no cbn_window_fill' in proc.stderr
