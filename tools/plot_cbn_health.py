# Copyright (c) mmcbn contributors. All rights reserved.
"""Plot the CBN health metrics of a run from its mmengine json log.

``CBNHook`` logs ``cbn_<metric>`` (and, with ``health_by_group=True``,
``cbn_<metric>_<group>``) at every ``LoggerHook`` interval. mmengine writes
them to ``WORK_DIR/<timestamp>/vis_data/scalars.json`` (LocalVisBackend) and
``.../vis_data/<timestamp>.json``. This draws one panel per question:

- how full the windows are (``window_fill``);
- how often the compensated variance needed the repair
  (``repaired_frac``);
- how large the compensation is against the batch's spread
  (``comp_mean``, ``comp_nu``);
- how far the batch's statistics are from the window's
  (``batch_vs_window_mean``, ``batch_vs_window_var``).

A dashed line marks the end of burn-in (the first logged iteration with a
window in use). Examples::

    python tools/plot_cbn_health.py work_dirs/demo/det --out health.png
    python tools/plot_cbn_health.py path/to/vis_data/scalars.json
"""
import argparse
import glob
import json
import os.path as osp
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional, Tuple

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

#: The metrics CBNHook logs (mmcbn.health.METRICS), without importing torch.
METRICS = ('window_fill', 'repaired_frac', 'comp_mean', 'comp_nu',
           'batch_vs_window_mean', 'batch_vs_window_var')
COUNTS = ('bound', 'frozen', 'unbound')
#: Panels: (title, metrics, y label).
PANELS = (
    ('window fill', ('window_fill', ), 'earlier entries used / window - 1'),
    ('entries repaired', ('repaired_frac', ),
     'fraction of (entry, channel) with nu < mu^2'),
    ('compensation size', ('comp_mean', 'comp_nu'),
     '|mean shift| / batch std,  |nu shift| / batch var'),
    ('batch vs window', ('batch_vs_window_mean', 'batch_vs_window_var'),
     '|mu_b - mu_w| / std_w,  |log var_b / var_w|'),
)
#: One series: steps and values.
Series = Tuple[List[int], List[float]]


def find_log(path: str) -> str:
    """The json log to read: ``path`` itself, or the newest
    ``vis_data/scalars.json`` under a work directory."""
    if osp.isfile(path):
        return path
    found = glob.glob(
        osp.join(path, '**', 'vis_data', 'scalars.json'), recursive=True)
    if not found:
        raise FileNotFoundError(f'no vis_data/scalars.json under {path}')
    return max(found, key=osp.getmtime)


def split_key(key: str) -> Optional[Tuple[str, str]]:
    """``cbn_<metric>[_<group>]`` -> (metric, group); group '' for the
    model-wide value. None for other keys."""
    if not key.startswith('cbn_'):
        return None
    rest = key[len('cbn_'):]
    for metric in sorted(METRICS + COUNTS, key=len, reverse=True):
        if rest == metric:
            return metric, ''
        if rest.startswith(metric + '_'):
            return metric, rest[len(metric) + 1:]
    return None


def load_cbn_scalars(path: str) -> Dict[Tuple[str, str], Series]:
    """Read the ``cbn_*`` scalars of a json log (one json object a line).

    Returns:
        dict: (metric, group) -> (steps, values), in the order logged;
        group '' is the model-wide value. Lines without a ``cbn_`` key
        (validation results) are skipped.
    """
    series: Dict[Tuple[str, str], Series] = defaultdict(lambda: ([], []))
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            entry = json.loads(line)
            if 'step' not in entry:
                continue
            for key, value in entry.items():
                parsed = split_key(key)
                if parsed is None:
                    continue
                steps, values = series[parsed]
                steps.append(int(entry['step']))
                values.append(float(value))
    return OrderedDict(sorted(series.items()))


def burnin_end(series: Dict[Tuple[str, str], Series]) -> Optional[int]:
    """The first logged step with a window in use (None if none)."""
    steps, values = series.get(('window_fill', ''), ([], []))
    return next((s for s, v in zip(steps, values) if v > 0), None)


def plot(series: Dict[Tuple[str, str], Series],
         title: Optional[str] = None) -> plt.Figure:
    """One panel per question. Colour: the model-wide value (black, thick)
    or a layer group; line style: the panel's first (solid) or second
    (dashed) metric."""
    if ('window_fill', '') not in series:
        raise ValueError('the log holds no cbn_window_fill: was the run '
                         "trained with dict(type='CBNHook')?")
    groups = sorted({g for (m, g) in series if g and m in METRICS})
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    end = burnin_end(series)
    styles = (('-', 'solid'), ('--', 'dashed'))
    for ax, (name, metrics, ylabel) in zip(axes.flat, PANELS):
        for (style, _), metric in zip(styles, metrics):
            steps, values = series[(metric, '')]
            ax.plot(steps, values, style, color='black', linewidth=1.5)
            for index, group in enumerate(groups):
                if (metric, group) not in series:
                    continue
                steps, values = series[(metric, group)]
                ax.plot(steps, values, style, color=f'C{index}', linewidth=0.8)
        if end is not None:
            ax.axvline(end, color='grey', linestyle=':', linewidth=1)
            ax.text(
                end,
                0.97,
                'burn-in ends ',
                transform=ax.get_xaxis_transform(),
                rotation=90,
                ha='right',
                va='top',
                fontsize=7,
                color='grey')
        if len(metrics) > 1:
            name += '\n' + ', '.join(
                f'{metric} ({word})'
                for (_, word), metric in zip(styles, metrics))
        else:
            name += f'\n{metrics[0]}'
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel('iteration')
    handles = [Line2D([], [], color='black', linewidth=1.5)] + [
        Line2D([], [], color=f'C{index}', linewidth=0.8)
        for index in range(len(groups))
    ]
    fig.legend(
        handles, ['model'] + list(groups),
        loc='lower center',
        ncol=len(handles),
        fontsize=8)
    counts = ', '.join(f'{int(series[(c, "")][1][-1])} {c}' for c in COUNTS
                       if (c, '') in series)
    heading = title or 'CBN health'
    fig.suptitle(
        f'{heading}\nlayers: {counts}' if counts else heading, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Plot the CBN health metrics (cbn_*) of a run from '
        'its mmengine json log')
    parser.add_argument(
        'log',
        help='a scalars.json / <timestamp>.json, or a work dir '
        '(its newest vis_data/scalars.json)')
    parser.add_argument(
        '--out',
        default='cbn_health.png',
        help='PNG to write '
        '(default: %(default)s)')
    parser.add_argument('--title', help='figure title')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    path = find_log(args.log)
    fig = plot(load_cbn_scalars(path), args.title)
    fig.savefig(args.out, dpi=120)
    print(f'{path} -> {args.out}')


if __name__ == '__main__':
    main()
