# Copyright (c) mmcbn contributors. All rights reserved.
"""Detection and segmentation at 2 images per iteration: BN vs GN vs CBN.

The demo models (``configs/demo/``: Mask R-CNN ResNet-18/FPN and FCN
ResNetV1c-18-d8, trained from scratch) on the demo's generated data
(``tools/make_demo_data.py``), each config in its BN, GN and CBN variant,
which differ only in the norm layers. Every (task, norm, seed) is one
training run with mmengine's Runner followed by a test of the final model
in the same process, with ``randomness.seed`` set to the seed: the same
schedule and the same seeds for every norm, so the seeds are paired (seed
``s`` draws the same data order and, where shapes agree, the same initial
weights for each norm). The demo configs' schedules are used unchanged
(validation during training off, as in ``make demo``).

Runs are independent processes (``--jobs`` at a time, each with
``--threads`` torch threads); a finished run is not repeated when its
result file exists in ``--work-dir`` (delete it to rerun), or when
``--reuse JSON`` (an earlier ``demo_tasks.json`` made with the same data
and mode) has it: then only the missing runs are trained, e.g. to add a
norm to committed results. Beware: a run repeats exactly on one machine
and environment, but runs of 2026-11-24 did not reproduce after the
environment was rebuilt on 2026-11-25 (several mIoU points, BN and CBN
alike), so reused and new runs are not paired by seed.

    python benchmarks/demo_tasks.py             # 3 seeds x 3 norms x 2 tasks
    python benchmarks/demo_tasks.py --norms bn gn cbnn cbn cbnw \
        --population --reuse benchmarks/results/demo_tasks.json
    python benchmarks/demo_tasks.py --quick     # smoke test (< 1 min)

Writes ``demo_tasks.json`` and ``demo_tasks.png`` into ``--out``.
"""
import argparse
import copy
import json
import math
import os
import os.path as osp
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from common import (ROOT, benchmark_parser, machine_info,  # noqa: E402
                    markdown_table, save_png, write_json)

sys.path.insert(0, ROOT)
sys.path.insert(0, osp.join(ROOT, 'tools'))
import demo  # noqa: E402
import make_demo_data  # noqa: E402

#: ``cbnw``: the CBN configs with ``running_stats_from='window'`` (eval
#: statistics from the window; an ablation, see the README). ``cbnn``:
#: naive CBN, the CBN configs with ``compensate=False`` (the window without
#: Taylor compensation). ``cbna``: the authors' backward rule
#: (``window_grad=False``: past entries are constants; ``cbn`` uses the
#: window gradient, the default). ``cbnu``: upstream-normalization
#: compensation with batch running statistics, ``cbnuw`` with window running
#: statistics (``compensate='upstream'``'s default).
NORMS = ('bn', 'gn', 'mabn', 'cbnn', 'cbna', 'cbn', 'cbnw', 'cbnu', 'cbnuw')
#: The CBN-config variants and the norm_cfg options each sets.
CBN_VARIANTS = {
    'cbnw': ('running_stats_from=window', ),
    'cbnn': ('compensate=False', ),
    'cbna': ('window_grad=False', ),
    'cbnu': ('compensate=upstream', 'running_stats_from=batch',
             'upstream_form=exact'),
    'cbnuw': ('compensate=upstream', 'running_stats_from=window',
              'upstream_form=exact'),
}
#: Images per batch when statistics are re-estimated (``--population``).
POPULATION_BATCH = 16
#: Where the demo configs put their norm_cfg, per task.
NORM_PARTS = {
    'det': ('backbone', 'neck', 'roi_head.bbox_head', 'roi_head.mask_head'),
    'seg': ('backbone', 'decode_head', 'auxiliary_head'),
}
TASKS = ('det', 'seg')
#: The metric reported per task (first) and the others kept in the JSON.
METRICS = {
    'det': ('coco/bbox_mAP', 'coco/segm_mAP', 'coco/bbox_mAP_50',
            'coco/segm_mAP_50'),
    'seg': ('mIoU', 'mAcc', 'aAcc'),
}
LABELS = {
    'coco/bbox_mAP': 'bbox mAP',
    'coco/segm_mAP': 'mask mAP',
    'coco/bbox_mAP_50': 'bbox mAP@50',
    'coco/segm_mAP_50': 'mask mAP@50',
    'mIoU': 'mIoU (%)',
    'mAcc': 'mAcc (%)',
    'aAcc': 'aAcc (%)',
}


def run_options(task: str, norm: str, seed: int, data_root: str,
                quick: bool) -> List[str]:
    """``--cfg-options`` of one run: data, schedule (``make demo``'s, or its
    ``--quick`` one) and seed."""
    config_norm = 'cbn' if norm in CBN_VARIANTS else norm
    opts = (demo._data_options(task, data_root, 'train') +
            demo._data_options(task, data_root, 'test') +
            demo._schedule_options(task, quick, config_norm) +
            demo._quick_test_options(task, quick) +
            [f'randomness.seed={seed}'])
    if norm in CBN_VARIANTS:
        opts += [
            f'model.{part}.norm_cfg.{option}'
            for part in NORM_PARTS[task] for option in CBN_VARIANTS[norm]
        ]
    return opts


def config_of(task: str, norm: str) -> str:
    return demo._config(demo.DET_CONFIG if task == 'det' else
                        demo.SEG_CONFIG,
                        'cbn' if norm in CBN_VARIANTS else norm)


def run_config(task: str, norm: str, seed: int, work_dir: str,
               data_root: str, quick: bool):
    """The config of one run, as ``tools/train.py`` would build it."""
    from mmengine.config import Config, DictAction

    import mmcbn  # noqa: F401
    from mmcbn.runner_setup import apply_common_args

    config = config_of(task, norm)
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    options = parser.parse_args(
        ['--cfg-options'] +
        run_options(task, norm, seed, data_root, quick)).cfg_options
    cfg = Config.fromfile(config)
    apply_common_args(
        cfg,
        config_path=config,
        launcher='none',
        work_dir=work_dir,
        cfg_options=options)
    return cfg


def _write_json(path: str, data: Dict) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def child_main(task: str, norm: str, seed: int, work_dir: str,
               data_root: str, quick: bool, result_file: str) -> None:
    """One run, in this process: train, then test the final model."""
    from mmengine.runner import Runner

    config = config_of(task, norm)
    cfg = run_config(task, norm, seed, work_dir, data_root, quick)
    start = time.perf_counter()
    runner = Runner.from_cfg(cfg)
    runner.train()
    train_s = time.perf_counter() - start
    metrics = runner.test()
    test_s = time.perf_counter() - start - train_s
    result = dict(
        task=task,
        norm=norm,
        seed=seed,
        config=osp.relpath(config, ROOT),
        train_seconds=round(train_s, 1),
        test_seconds=round(test_s, 1),
        metrics={k: float(metrics[k])
                 for k in METRICS[task] if k in metrics})
    _write_json(result_file, result)


def reestimate_norm_stats(model, loader) -> int:
    """Replace the running statistics of every BN-style layer (BN, CBN,
    MABN) by the exactly pooled statistics of one pass of ``loader`` in
    train mode (:func:`mmcbn.precise_stats.recompute_statistics`, "precise
    BN"). Returns the number of layers updated."""
    from mmcbn.precise_stats import recompute_statistics

    def forward(model, batch):
        return model(**model.data_preprocessor(batch, True), mode='loss')

    report = recompute_statistics(model, loader, forward=forward)
    model.eval()
    return len(report['updated'])


def child_population(task: str, norm: str, seed: int, work_dir: str,
                     data_root: str, quick: bool, out_file: str) -> None:
    """Test a finished run's checkpoint again after re-estimating its
    normalization statistics on the training set, in batches of
    ``POPULATION_BATCH`` images (a diagnostic: how much of a result is due
    to the running statistics rather than the trained weights)."""
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    cfg = run_config(task, norm, seed, osp.join(work_dir, 'population'),
                     data_root, quick)
    cfg.load_from = demo._last_checkpoint(work_dir)
    loader_cfg = copy.deepcopy(cfg.train_dataloader)
    loader_cfg.batch_size = POPULATION_BATCH
    loader_cfg.sampler = dict(type='DefaultSampler', shuffle=False)
    runner = Runner.from_cfg(cfg)
    counted = {}

    class PopulationStats(Hook):

        def before_test(self, runner) -> None:
            loader = runner.build_dataloader(loader_cfg)
            counted['layers'] = reestimate_norm_stats(runner.model, loader)
            counted['images'] = len(loader.dataset)

    runner.register_hook(PopulationStats(), priority='LOWEST')
    metrics = runner.test()
    _write_json(out_file, dict(
        checkpoint=osp.relpath(cfg.load_from, ROOT),
        batch_size=POPULATION_BATCH, **counted,
        metrics={k: float(metrics[k]) for k in METRICS[task]
                 if k in metrics}))


def launch(task: str, norm: str, seed: int, args,
           population: bool = False) -> Dict:
    """Run one (task, norm, seed) in a subprocess, or reuse its result;
    with ``population``, its re-estimated-statistics test instead."""
    name = f'{task}_{norm}_seed{seed}'
    work_dir = osp.join(args.work_dir, name)
    result_file = osp.join(work_dir, 'population.json' if population else
                           'result.json')
    if population:
        name += ' (population statistics)'
    earlier = args.reused.get((task, norm, seed))
    if earlier is not None and (not population or 'population' in earlier):
        print(f'[{name}] reusing {args.reuse}', flush=True)
        earlier = copy.deepcopy(earlier)
        if population:
            return earlier['population']
        earlier.pop('population', None)
        return earlier
    if osp.isfile(result_file):
        with open(result_file) as f:
            print(f'[{name}] reusing {osp.relpath(result_file)}', flush=True)
            return json.load(f)
    if args.finished_only:
        print(f'[{name}] not run (--finished-only)', flush=True)
        return None
    os.makedirs(work_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    cmd = [
        sys.executable,
        osp.abspath(__file__), '--child', task, norm,
        str(seed), '--work-dir', work_dir, '--data-root', args.data_root
    ] + (['--quick'] if args.quick else []) + (
        ['--population'] if population else [])
    print(f'[{name}] started', flush=True)
    start = time.perf_counter()
    log_name = 'population.log' if population else 'stdout.log'
    with open(osp.join(work_dir, log_name), 'w') as log:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not osp.isfile(result_file):
        raise RuntimeError(
            f'run {name} failed (exit status {proc.returncode}); see '
            f'{osp.join(work_dir, log_name)}')
    with open(result_file) as f:
        result = json.load(f)
    print(f'[{name}] done in {time.perf_counter() - start:.0f} s: '
          f'{result["metrics"]}', flush=True)
    return result


def reused_runs(path, data_seed: int, sizes: Dict, quick: bool,
                threads: int) -> Dict:
    """``{(task, norm, seed): run}`` of an earlier demo_tasks JSON, after
    checking that it was made on the same data, in the same mode and with
    the same threads per run (its runs are then what this script would
    compute: a run is deterministic for a seed and a thread count)."""
    if not path:
        return {}
    with open(path) as f:
        old = json.load(f)
    cfg = old.get('config', {})
    # the data are a function of their seed and sizes, wherever they are
    want = dict(seed=data_seed, **sizes)
    data = {k: v for k, v in cfg.get('data', {}).items() if k != 'root'}
    made = (data, cfg.get('quick'), cfg.get('threads_per_run'))
    if old.get('benchmark') != 'demo_tasks' or made != (want, quick,
                                                         threads):
        raise SystemExit(f'--reuse {path}: made with (data, quick, threads) '
                         f'= {made}, not {(want, quick, threads)}')
    return {(r['task'], r['norm'], r['seed']): r for r in old['runs']}


def _stats(values: List[float]) -> Dict:
    return dict(
        mean=statistics.fmean(values),
        std=statistics.stdev(values) if len(values) > 1 else 0.0,
        values=values)


def summarize(runs: List[Dict], tasks, norms) -> Dict:
    """Mean, sample std and per-seed values of every metric."""
    summary = {}
    for task in tasks:
        for norm in norms:
            mine = sorted((r for r in runs
                           if r['task'] == task and r['norm'] == norm),
                          key=lambda r: r['seed'])
            if not mine:
                continue
            entry = dict(
                seeds=[r['seed'] for r in mine],
                train_seconds=statistics.fmean(r['train_seconds']
                                               for r in mine))
            for metric in METRICS[task]:
                entry[metric] = _stats([r['metrics'][metric] for r in mine])
            if all('population' in r for r in mine):
                entry['population'] = {
                    metric: _stats([
                        r['population']['metrics'][metric] for r in mine
                    ])
                    for metric in METRICS[task]
                }
            summary[f'{task}/{norm}'] = entry
    return summary


#: Display names.
NAMES = {'bn': 'BN', 'gn': 'GN', 'mabn': 'MABN', 'cbn': 'CBN',
         'cbnw': 'CBN-w',
         'cbnn': 'naive CBN', 'cbna': "CBN, authors' backward",
         'cbnu': 'CBN-up', 'cbnuw': 'CBN-up-w'}
#: The paired comparisons reported, (a, b): a minus b.
PAIRS = (('cbn', 'bn'), ('cbn', 'gn'), ('cbnw', 'cbn'), ('cbnw', 'bn'),
         ('cbnn', 'bn'), ('cbn', 'cbnn'), ('cbn', 'cbna'), ('cbna', 'bn'),
         ('cbnu', 'cbn'), ('cbnu', 'bn'), ('cbnu', 'gn'), ('cbnuw', 'cbnw'),
         ('cbnuw', 'bn'), ('cbnuw', 'gn'), ('mabn', 'bn'), ('mabn', 'gn'),
         ('cbn', 'mabn'), ('cbnuw', 'mabn'))


def paired_differences(summary: Dict, tasks) -> Dict:
    """Per-seed differences (:data:`PAIRS`) of each task's main metrics,
    over the seeds both runs have."""
    out = {}
    for task in tasks:
        for a, b in PAIRS:
            ra, rb = summary.get(f'{task}/{a}'), summary.get(f'{task}/{b}')
            if ra is None or rb is None:
                continue
            seeds = [s for s in ra['seeds'] if s in rb['seeds']]
            if not seeds:
                continue
            for metric in METRICS[task][:2]:
                va = dict(zip(ra['seeds'], ra[metric]['values']))
                vb = dict(zip(rb['seeds'], rb[metric]['values']))
                diffs = [va[s] - vb[s] for s in seeds]
                out[f'{task}: {LABELS[metric]} {NAMES[a]} - {NAMES[b]}'] = \
                    dict(mean=statistics.fmean(diffs),
                         wins=sum(d > 0 for d in diffs),
                         seeds=len(diffs),
                         values=diffs)
    return out


def tables(summary: Dict, diffs: Dict, tasks, norms) -> str:
    rows = []
    shown = [(task, m) for task in tasks for m in METRICS[task][:2]]
    most = max(len(e['seeds']) for e in summary.values())
    for norm in norms:
        fewer = {len(summary[f'{t}/{norm}']['seeds'])
                 for t in tasks if f'{t}/{norm}' in summary} - {most}
        row = [NAMES[norm] + (f' ({min(fewer)} seeds)' if fewer else '')]
        for task, metric in shown:
            e = summary.get(f'{task}/{norm}')
            row.append('-' if e is None else
                       f'{e[metric]["mean"]:.3g} ± {e[metric]["std"]:.2g}')
        row.append(' / '.join(
            f'{summary[f"{t}/{norm}"]["train_seconds"]:.0f}' for t in tasks
            if f'{t}/{norm}' in summary))
        rows.append(row)
    text = markdown_table(['norm'] + [LABELS[m] for _, m in shown] +
                          ['train s (' + ' / '.join(tasks) + ')'], rows)
    pop_rows = []
    for norm in norms:
        entries = [summary.get(f'{task}/{norm}') for task, _ in shown]
        if not any(e and 'population' in e for e in entries):
            continue
        pop_rows.append([NAMES[norm]] + [
            f'{e["population"][m]["mean"]:.3g} ± '
            f'{e["population"][m]["std"]:.2g} '
            f'({e["population"][m]["mean"] - e[m]["mean"]:+.2g})'
            if e and 'population' in e else '-'
            for e, (_, m) in zip(entries, shown)
        ])
    if pop_rows:
        text += ('\n\nEval statistics re-estimated on the training set '
                 f'(batches of {POPULATION_BATCH}), change vs the running '
                 'statistics in brackets:\n\n' + markdown_table(
                     ['norm'] + [LABELS[m] for _, m in shown], pop_rows))
    if diffs:
        text += '\n\n' + markdown_table(
            ['paired difference a - b', 'mean', 'seeds a ahead',
             'per seed'],
            [[k, f'{v["mean"]:+.3g}', f'{v["wins"]}/{v["seeds"]}',
              ', '.join(f'{d:+.3g}' for d in v['values'])]
             for k, v in diffs.items()])
    return text


def plot(summary: Dict, tasks, norms, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    shown = [(task, m) for task in tasks for m in METRICS[task][:2]]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4))
    axes = [axes] if len(shown) == 1 else list(axes)
    colors = {'bn': '#4c72b0', 'gn': '#55a868', 'mabn': '#64b5cd',
              'cbn': '#c44e52',
              'cbnw': '#dd8452', 'cbnn': '#8172b3', 'cbna': '#937860',
              'cbnu': '#da8bc3', 'cbnuw': '#8c8c8c'}
    for ax, (task, metric) in zip(axes, shown):
        for i, norm in enumerate(norms):
            e = summary.get(f'{task}/{norm}')
            if e is None:
                continue
            v = e[metric]
            ax.bar(i, v['mean'], yerr=v['std'], color=colors[norm],
                   alpha=0.6, capsize=4)
            ax.plot([i] * len(v['values']), v['values'], 'k.', ms=5)
        ax.set_xticks(range(len(norms)))
        ax.set_xticklabels([NAMES[n].replace(' ', '\n') for n in norms])
        lows = [min(summary[f'{task}/{n}'][metric]['values']) for n in norms
                if f'{task}/{n}' in summary]
        highs = [max(summary[f'{task}/{n}'][metric]['values']) for n in norms
                 if f'{task}/{n}' in summary]
        span = max(highs) - min(lows) or 1.0
        ax.set_ylim(max(0.0, min(lows) - span), max(highs) + 0.5 * span)
        ax.set_title(f'{"Mask R-CNN" if task == "det" else "FCN"}: '
                     f'{LABELS[metric]}', fontsize=9)
        ax.grid(axis='y', alpha=0.3)
    counts = sorted({len(e['seeds']) for e in summary.values()})
    n_seeds = (str(counts[0]) if len(counts) == 1 else
               f'{counts[0]}-{counts[-1]}')
    fig.suptitle('Demo data, 2 images per iteration, from scratch '
                 f'(mean ± std over {n_seeds} seeds; dots: seeds)',
                 fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def main(argv=None) -> Dict:
    parser = benchmark_parser(
        __doc__, 'one seed, a few segmentation iterations on tiny data '
        '(smoke test)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--norms', nargs='+', choices=NORMS,
                        default=['bn', 'gn', 'cbn'],
                        help='cbnw: CBN with window running statistics')
    parser.add_argument('--tasks', nargs='+', choices=TASKS,
                        default=list(TASKS))
    parser.add_argument('--jobs', type=int, default=2,
                        help='runs at a time (default: %(default)s)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads per run (default: %(default)s)')
    parser.add_argument('--work-dir', help='runs go here (default: '
                        'work_dirs/demo_tasks[_quick])')
    parser.add_argument('--data-root', help='demo data (default: data/demo, '
                        'or WORK_DIR/data with --quick); generated if absent')
    parser.add_argument('--data-seed', type=int, default=0,
                        help='seed of the generated data (default: 0)')
    parser.add_argument('--population', action='store_true',
                        help='also test every BN/CBN run again with its '
                        'norm statistics re-estimated on the training set '
                        f'(batches of {POPULATION_BATCH}; diagnostic)')
    parser.add_argument('--reuse', metavar='JSON',
                        help='take the runs an earlier demo_tasks JSON has '
                        '(same data and mode) instead of training them')
    parser.add_argument('--finished-only', action='store_true',
                        help='train nothing: report the runs that are '
                        'finished or reused (a norm may then have fewer '
                        'seeds; paired differences use the common seeds)')
    parser.add_argument('--child', nargs=3, metavar=('TASK', 'NORM', 'SEED'),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error(f'--jobs and --threads must be >= 1, got '
                     f'{args.jobs} and {args.threads}')
    if args.child:
        task, norm, seed = args.child
        if args.population:
            child_population(task, norm, int(seed), args.work_dir,
                             args.data_root, args.quick,
                             osp.join(args.work_dir, 'population.json'))
        else:
            child_main(task, norm, int(seed), args.work_dir, args.data_root,
                       args.quick, osp.join(args.work_dir, 'result.json'))
        return {}

    if args.quick:
        args.seeds, args.tasks = args.seeds[:1], ['seg']
    suffix = '_quick' if args.quick else ''
    args.work_dir = osp.abspath(args.work_dir or osp.join(
        ROOT, 'work_dirs', f'demo_tasks{suffix}'))
    args.data_root = osp.abspath(args.data_root or (
        osp.join(args.work_dir, 'data') if args.quick else osp.join(
            ROOT, 'data', 'demo')))
    sizes = demo.QUICK_DATA if args.quick else demo.FULL_DATA
    args.reused = reused_runs(args.reuse, args.data_seed, sizes, args.quick,
                              args.threads)
    if not make_demo_data.is_generated(args.data_root, args.data_seed,
                                       **sizes):
        make_demo_data.generate(args.data_root, args.data_seed, **sizes)
    norms = [n for n in NORMS if n in args.norms]
    tasks = [t for t in TASKS if t in args.tasks]
    jobs = [(t, n, s) for s in args.seeds for t in tasks for n in norms]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda j: launch(*j, args), jobs))
        jobs = [j for j, r in zip(jobs, runs) if r is not None]
        runs = [r for r in runs if r is not None]
        if args.population:
            # GN has no statistics to re-estimate; CBN-w trains the very
            # weights CBN does (the option only changes the running stats);
            # naive CBN is left out to save machine time
            pop_jobs = [j for j in jobs if j[1] in ('bn', 'mabn', 'cbn')]
            pops = pool.map(lambda j: launch(*j, args, population=True),
                            pop_jobs)
            for job, pop in zip(pop_jobs, pops):
                if pop is not None:
                    runs[jobs.index(job)]['population'] = pop
    bad = [(r['task'], r['norm'], r['seed'], k, v) for r in runs
           for k, v in r['metrics'].items() if not math.isfinite(v)]
    if bad:
        sys.exit(f'demo_tasks: non-finite metrics: {bad}')

    summary = summarize(runs, tasks, norms)
    diffs = paired_differences(summary, tasks)
    text = tables(summary, diffs, tasks, norms)
    print(text)
    data = dict(
        benchmark='demo_tasks',
        machine=machine_info(),
        config=dict(
            quick=args.quick,
            seeds=args.seeds,
            norms=norms,
            tasks=tasks,
            jobs=args.jobs,
            threads_per_run=args.threads,
            data=dict(root=osp.relpath(args.data_root, ROOT),
                      seed=args.data_seed, **sizes),
            configs={t: [config_of(t, n) for n in norms] for t in tasks},
            cbnw_options='the CBN configs with --cfg-options '
            'model.<part>.norm_cfg.running_stats_from=window for every '
            'part that has a norm_cfg',
            cbnn_options='the CBN configs with --cfg-options '
            'model.<part>.norm_cfg.compensate=False (naive CBN)',
            cbna_options='the CBN configs with --cfg-options '
            "model.<part>.norm_cfg.window_grad=False (the authors' "
            'backward rule)',
            reused=args.reuse and osp.relpath(osp.abspath(args.reuse), ROOT),
            reused_runs=sorted(f'{t}_{n}_seed{s}'
                               for (t, n, s) in args.reused
                               if (t, n, s) in jobs),
            images_per_iteration=2,
            finished_only=args.finished_only,
            population_batch=POPULATION_BATCH if args.population else None),
        wall_seconds=round(time.perf_counter() - start, 1),
        runs=runs,
        summary=summary,
        paired_differences=diffs,
        table=text)
    data['config']['configs'] = {
        t: [osp.relpath(c, ROOT) for c in cs]
        for t, cs in data['config']['configs'].items()
    }
    write_json(osp.join(args.out, f'demo_tasks{suffix}.json'), data)
    plot(summary, tasks, norms, osp.join(args.out, f'demo_tasks{suffix}.png'))
    return data


if __name__ == '__main__':
    main()
