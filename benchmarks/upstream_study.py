# Copyright (c) mmcbn contributors. All rights reserved.
"""Should I use CBN or GN at batch 2? Each method at its own tuned learning
rate, on the photo-crops task of ``small_batch_photos.py``.

Protocol:

1. **Tuning.** The training crops are split per class into a training part
   and a validation part (the last ``--n-val`` training crops of every
   class). Every method trains on the training part at each base learning
   rate of ``--lrs`` (``lr = base_lr * batch / 32``, cosine to 0) with the
   first ``--tune-seeds``, and is scored by its validation accuracy (eval
   mode). The test crops are not used.
2. **Final runs.** Each method trains on the whole training set at its
   chosen learning rate with every seed of ``--seeds`` (paired: a seed
   fixes the initialization, data order and flips of every method) and is
   scored on the test crops. Loss curves and producer weight norms per
   tenth of the schedule are kept.

Methods: BN at batches 2 and 32, GN at batch 2, and CBN at batch 2 with
window 8 (burn-in 25% of the iterations) in four settings: the producer's
compensation only (``compensate=True``), the same with window running
statistics (``running_stats_from='window'``), the upstream-normalization
compensation with batch running statistics (``compensate='upstream',
running_stats_from='batch'``), and with window running statistics (the
option's default). A reference row, the "ceiling", re-runs the samples of
the last 7 iterations through the *current* network with the current
batch (BN over 16 images, the loss on the current 2; 8 times the
compute): what a perfect compensation would give.

    python benchmarks/upstream_study.py --ceiling-lr 0.1  # full (1 thread)
    python benchmarks/upstream_study.py --quick    # smoke test (< 2 min)
    python benchmarks/upstream_study.py --methods 'GN b2' 'BN b2'

Writes ``upstream_study.json`` and ``upstream_study.png`` into ``--out``.
Finished runs are kept in ``--work-dir``'s ``runs.jsonl`` (keyed by the
settings, method, learning rate, split and seed), so that an interrupted
study, or a study split over several processes with ``--methods``, picks
them up.
"""
import copy
import json
import os
import os.path as osp
import statistics
import sys

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from common import (ROOT, Timer, benchmark_parser, machine_info,  # noqa: E402
                    markdown_table, save_png, write_json)
from small_batch import mean_std  # noqa: E402
from small_batch_photos import (add_task_arguments,  # noqa: E402
                                load_data, load_finished, settings_key,
                                train_one)

WINDOW = 8
BURNIN = 0.25


def methods():
    """The compared methods (``small_batch_photos`` run specs)."""
    cbn = dict(norm='cbn', batch=2, burnin=BURNIN)
    out = [
        dict(name='BN b2', norm='bn', batch=2, kwargs={}),
        dict(name='BN b32', norm='bn', batch=32, kwargs={}),
        dict(name='GN b2', norm='gn', batch=2, kwargs=dict(groups=8)),
        dict(cbn, name='CBN b2', kwargs=dict(window=WINDOW)),
        dict(cbn, name='CBN-w b2',
             kwargs=dict(window=WINDOW, running_stats_from='window')),
        dict(cbn, name='CBN-up b2',
             kwargs=dict(window=WINDOW, compensate='upstream',
                         running_stats_from='batch', upstream_form='exact')),
        dict(cbn, name='CBN-up-w b2',
             kwargs=dict(window=WINDOW, compensate='upstream',
                         running_stats_from='window',
                         upstream_form='exact')),
        dict(name='ceiling b2', norm='bn', batch=2, kwargs={},
             ceiling=WINDOW),
    ]
    for spec in out:
        spec.setdefault('burnin', None)
        spec.setdefault('data', 'photos')
    return out


def validation_split(data, n_val):
    """The last ``n_val`` training crops of every class as the test set,
    the others as the training set."""
    y = data['y_tr']
    val = torch.zeros(len(y), dtype=torch.bool)
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        val[idx[-n_val:]] = True
    out = dict(data)
    out.update(x_tr=data['x_tr'][~val], y_tr=y[~val],
               x_te=data['x_tr'][val], y_te=y[val])
    return out


#: Arguments that change what a run computes.
RUN_ARGS = ('epochs', 'weight_decay', 'widths', 'blocks', 'short', 'grid',
            'crop', 'n_train', 'n_test', 'n_photos', 'data_seed', 'threads',
            'n_val', 'quick')


def _run_key(entry):
    return entry['name'], entry['base_lr'], entry['split'], entry['seed']


def run(spec, base_lr, split, seed, data, args, finished, path):
    """One run (reused from ``finished`` when there)."""
    key = (spec['name'], base_lr, split, seed)
    if key in finished:
        return finished[key]
    run_args = copy.copy(args)
    run_args.base_lr = base_lr
    r = train_one(spec, seed, data[split], run_args)
    r['seed'] = seed
    with open(path, 'a') as f:
        f.write(json.dumps(dict(settings=settings_key(args, RUN_ARGS),
                                name=spec['name'], base_lr=base_lr,
                                split=split, seed=seed, run=r)) + '\n')
    print(f"{split:<4} {spec['name']:<12} base lr {base_lr:<5} seed {seed}"
          f"  acc {r['test_acc']:6.2f}  loss {r['train_loss_last_tenth']:.3f}"
          f"  {r['seconds']:.0f}s", flush=True)
    finished[key] = r
    return r


def paired(summary, a, b, key='accs', key_b=None):
    """``a - b`` per seed, mean, paired s.e., wins (of ``summary[a][key]``
    against ``summary[b][key_b or key]``)."""
    if a not in summary or b not in summary:
        return None
    d = [x - y for x, y in zip(summary[a][key], summary[b][key_b or key])]
    m, s = mean_std(d)
    return dict(a=a, b=b, diff=m, paired_se=s / max(len(d), 1)**0.5,
                per_seed=d, wins=sum(x > 0 for x in d), n=len(d))


#: The comparisons reported (a minus b).
PAIRS = (('CBN-up b2', 'GN b2'), ('CBN-up-w b2', 'GN b2'),
         ('CBN-up b2', 'BN b32'), ('CBN-up-w b2', 'BN b32'),
         ('CBN-up b2', 'CBN b2'), ('CBN-up-w b2', 'CBN-w b2'),
         ('CBN b2', 'GN b2'), ('CBN-w b2', 'GN b2'), ('GN b2', 'BN b32'),
         ('CBN-up b2', 'BN b2'), ('ceiling b2', 'CBN-up b2'),
         ('ceiling b2', 'GN b2'))


def plot(summary, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    # distinct colours for up to 20 rows, then dashed lines
    colors = plt.cm.tab20.colors
    for i, (name, v) in enumerate(summary.items()):
        style = dict(marker='.', label=name, color=colors[i % 20],
                     linestyle='-' if i < 20 else '--')
        tenths = range(1, len(v['loss_curve']) + 1)
        ax.plot(tenths, v['loss_curve'], **style)
        bx.plot(range(len(v['stem_norm_curve'])), v['stem_norm_curve'],
                **style)
    ax.set_xlabel('tenth of the schedule')
    ax.set_ylabel('mean training loss (seed mean)')
    ax.set_title(title, fontsize=9)
    bx.set_xlabel('tenth of the schedule (0: init)')
    bx.set_ylabel('stem conv weight norm (seed mean)')
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    plt.close(fig)


#: How the tables name the accuracy a comparison uses.
ACC_NAMES = {'accs': '', 'accs_pop': ' (re-estimated)'}


def pair_label(a, b, key='accs', key_b=None):
    return f'{a}{ACC_NAMES[key]} - {b}{ACC_NAMES[key_b or key]}'


def study_parser(doc):
    """The options of a tuned-lr study on the photo crops."""
    parser = benchmark_parser(doc, 'tiny smoke run (< 2 min), for tests')
    parser.add_argument('--seeds', type=int, nargs='+',
                        default=[0, 1, 2, 3, 4])
    parser.add_argument('--tune-seeds', type=int, nargs='+', default=[0])
    parser.add_argument('--lrs', type=float, nargs='+',
                        default=[0.05, 0.1, 0.2, 0.4],
                        help='base learning rates tried (at batch 32)')
    parser.add_argument('--methods', nargs='+', default=None)
    parser.add_argument('--ceiling-lr', type=float, default=None,
                        help='base lr of the ceiling row (default: tuned)')
    add_task_arguments(parser)
    parser.add_argument('--n-val', type=int, default=5,
                        help='validation crops per class (from training)')
    parser.add_argument('--work-dir')
    return parser


def quick_settings(args):
    """``--quick``: one seed, one epoch, a tiny task and net."""
    args.seeds, args.tune_seeds, args.epochs = [0], [0], 1
    args.lrs = [0.1, 0.4]
    args.n_photos, args.n_train, args.n_test, args.n_val = 6, 8, 4, 2
    args.widths = [8, 16, 32, 64]


def tune_and_test(specs, args, name):
    """Tune every spec's base lr on the validation split (mean over
    ``--tune-seeds``; a spec's own ``lrs`` replace ``--lrs``), then run the
    test seeds at the chosen rate (a spec with ``tune=False`` runs at
    the first of its ``lrs``, untuned). Finished runs are kept in
    ``work_dirs/<name>/runs.jsonl`` (or ``--work-dir``).

    Returns:
        tuple: ``tuning`` {method: {lr: val acc}}, ``chosen`` {method: lr},
        ``results`` {method: [test run per seed]}.
    """
    photos = load_data('photos', args)
    data = dict(val=validation_split(photos, args.n_val), test=photos)
    tag = '_quick' if args.quick else ''
    work_dir = args.work_dir or osp.join(ROOT, 'work_dirs', f'{name}{tag}')
    os.makedirs(work_dir, exist_ok=True)
    path = osp.join(work_dir, 'runs.jsonl')
    finished = load_finished(path, args, RUN_ARGS, _run_key)
    tuning, chosen = {}, {}
    for spec in specs:
        lrs = spec.get('lrs', args.lrs)
        if args.quick:
            lrs = args.lrs
        if spec.get('ceiling') and args.ceiling_lr is not None:
            lrs = [args.ceiling_lr]
        if not spec.get('tune', True):  # a given rate: no tuning runs
            tuning[spec['name']] = {lrs[0]: float('nan')}
            chosen[spec['name']] = lrs[0]
            continue
        scores = {}
        for lr in lrs:
            accs = [run(spec, lr, 'val', s, data, args, finished,
                        path)['test_acc'] for s in args.tune_seeds]
            scores[lr] = statistics.fmean(accs)
        tuning[spec['name']] = scores
        chosen[spec['name']] = max(lrs, key=lambda lr: scores[lr])
    results = {}
    for seed in args.seeds:
        for spec in specs:
            results.setdefault(spec['name'], []).append(
                run(spec, chosen[spec['name']], 'test', seed, data, args,
                    finished, path))
    return tuning, chosen, results


def _mean_of(rs, key):
    values = [r[key] for r in rs if key in r]
    return statistics.fmean(values) if values else float('nan')


def summarize(specs, tuning, chosen, results):
    """Per method: accuracies per seed, their mean and std, the
    re-estimated-statistics accuracies, loss and weight-norm curves."""
    summary = {}
    for spec in specs:
        rs = results[spec['name']]
        accs = [r['test_acc'] for r in rs]
        m, s = mean_std(accs)
        summary[spec['name']] = dict(
            base_lr=chosen[spec['name']], lr=rs[0]['lr'], accs=accs,
            acc_mean=m, acc_std=s,
            # the same networks with eval statistics re-estimated exactly
            # (mmcbn.precise_stats): from the whole training set in one
            # pass, and from 200 training batches of the run's size (what
            # PreciseStatsHook does)
            acc_pop_mean=_mean_of(rs, 'test_acc_population_stats'),
            accs_pop=[r.get('test_acc_population_stats') for r in rs],
            acc_precise_mean=_mean_of(rs, 'test_acc_precise_batches'),
            accs_precise=[r.get('test_acc_precise_batches') for r in rs],
            val_acc=tuning[spec['name']][chosen[spec['name']]],
            train_loss_last_tenth=statistics.fmean(
                r['train_loss_last_tenth'] for r in rs),
            stem_norm_end=statistics.fmean(r['stem_norm_end'] for r in rs),
            loss_curve=[statistics.fmean(c) for c in zip(
                *(r['loss_curve'] for r in rs))],
            stem_norm_curve=[statistics.fmean(c) for c in zip(
                *(r['stem_norm_curve'] for r in rs))],
            seconds_per_run=statistics.fmean(r['seconds'] for r in rs))
    return summary


def tables(summary, tuning, chosen, checks, lrs, seeds):
    """The lr table, the test table and the paired-difference table."""
    all_lrs = sorted({lr for v in tuning.values() for lr in v} | set(lrs))
    lr_rows = [[name] + [f'{v.get(lr, float("nan")):.1f}' for lr in
                         all_lrs] + [chosen[name]]
               for name, v in tuning.items()]
    lr_table = markdown_table(
        ['method'] + [f'val acc @ {lr}' for lr in all_lrs] +
        ['chosen base lr'], lr_rows)
    table = markdown_table(
        ['method', 'base lr', f'test acc ({len(seeds)} seeds)',
         'per seed', 'with re-estimated statistics (train set)',
         're-estimated, 200 batches', 'last-tenth loss', 'stem |W| end',
         's / run'],
        [[n, v['base_lr'], f"**{v['acc_mean']:.1f} ± {v['acc_std']:.1f}**",
          ' / '.join(f'{a:.1f}' for a in v['accs']),
          f"{v['acc_pop_mean']:.1f}", f"{v['acc_precise_mean']:.1f}",
          f"{v['train_loss_last_tenth']:.2f}", f"{v['stem_norm_end']:.2f}",
          f"{v['seconds_per_run']:.0f}"] for n, v in summary.items()])
    check_table = markdown_table(
        ['a - b', 'paired diff', 'wins', 'per seed'],
        [[k, f"{c['diff']:+.1f} ± {c['paired_se']:.1f}",
          f"{c['wins']}/{c['n']}",
          ' '.join(f'{d:+.1f}' for d in c['per_seed'])]
         for k, c in checks.items()])
    return lr_table, table, check_table


def run_study(argv, doc, name, specs, pairs, title):
    """A whole study: parse, tune, test, summarize, write JSON and PNG."""
    args = study_parser(doc).parse_args(argv)
    if args.quick:
        quick_settings(args)
    torch.set_num_threads(args.threads)
    timer = Timer()
    if args.methods:
        unknown = set(args.methods) - {s['name'] for s in specs}
        if unknown:
            raise SystemExit(f'unknown methods: {sorted(unknown)}')
        specs = [s for s in specs if s['name'] in args.methods]
    tuning, chosen, results = tune_and_test(specs, args, name)
    summary = summarize(specs, tuning, chosen, results)
    if callable(pairs):
        pairs = pairs(summary)
    checks = {}
    for pair in pairs:
        a, b, *keys = pair
        label = f'{a} - {b}' if not keys else pair_label(a, b, *keys)
        if (c := paired(summary, a, b, *keys)) is not None:
            checks[label] = c
    lr_table, table, check_table = tables(summary, tuning, chosen, checks,
                                          args.lrs, args.seeds)
    print(lr_table, table, check_table, sep='\n\n')
    tag = '_quick' if args.quick else ''
    out = dict(benchmark=name, machine=machine_info(),
               config=dict({k: v for k, v in vars(args).items()
                            if k not in ('out', 'work_dir')},
                           window=WINDOW, burnin=BURNIN),
               methods=specs, tuning=tuning, chosen=chosen, summary=summary,
               checks=checks, runs=results, lr_markdown=lr_table,
               table_markdown=table, checks_markdown=check_table,
               total_seconds=timer())
    write_json(osp.join(args.out, f'{name}{tag}.json'), out)
    plot(summary, osp.join(args.out, f'{name}{tag}.png'),
         f'{title}, {len(args.seeds)} seeds')
    return out


def main(argv=None):
    return run_study(argv, __doc__, 'upstream_study', methods(), PAIRS,
                     'photo crops, batch 2, tuned lr')


if __name__ == '__main__':
    main()
