# Copyright (c) mmcbn contributors. All rights reserved.
"""The mmcbn demo (``make demo``): train and evaluate CBN models on CPU.

Steps, each a run of the project's own command-line tools (so the output is
mmengine's usual logs, with ETA):

1. generate the synthetic datasets (``tools/make_demo_data.py``; skipped
   when ``--data-root`` already holds them with the same seed and sizes);
2. train Mask R-CNN (ResNet-18/FPN, CBN) on the COCO-format shapes
   (``tools/train.py configs/demo/mask-rcnn_r18_fpn_cbn_demo.py``);
3. evaluate it (``tools/test.py``): COCO bbox and segm mAP;
4. train an FCN (ResNetV1c-18-d8, CBN) on the mmseg folder dataset
   (``configs/demo/fcn_r18-d8_cbn_demo.py``);
5. evaluate it: mIoU;
6. if ``tools/publish_model.py`` exists, export both checkpoints.

It ends with a summary of the metrics, times and paths, also written to
``WORK_DIR/summary.json``. Examples::

    python tools/demo.py                       # the full demo, minutes
    python tools/demo.py --quick --work-dir /tmp/demo   # ~1 minute, for CI
    python tools/demo.py --norm bn             # the BatchNorm baselines

OpenMP threads busy-wait by default; on a CPU shared with other jobs that
slows training down several times, so the demo runs the tools with
``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set already.
"""
import argparse
import glob
import json
import math
import os
import os.path as osp
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools'))

import make_demo_data  # noqa: E402

#: Dataset sizes: (num_train, num_val, image size).
FULL_DATA = dict(num_train=300, num_val=60, size=128)
QUICK_DATA = dict(num_train=8, num_val=4, size=128)
#: --quick schedules: detection epochs (4 iterations each on 8 images,
#: burn-in 1 epoch from the config) and segmentation iterations.
QUICK_DET_EPOCHS = 2
QUICK_SEG_ITERS = 6
QUICK_SEG_BURNIN = 2

DET_CONFIG = 'configs/demo/mask-rcnn_r18_fpn_{norm}_demo.py'
SEG_CONFIG = 'configs/demo/fcn_r18-d8_{norm}_demo.py'
DET_METRICS = ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP',
               'coco/segm_mAP_50')
SEG_METRICS = ('mIoU', 'mAcc', 'aAcc')
#: No validation during training: the test step evaluates the final model.
NO_VAL = ['val_dataloader=None', 'val_cfg=None', 'val_evaluator=None']


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Train and evaluate the CBN demo models (detection, '
        'instance and semantic segmentation) on synthetic data, on CPU')
    parser.add_argument(
        '--quick',
        action='store_true',
        help='a few iterations per task on a tiny dataset (for tests)')
    parser.add_argument(
        '--work-dir',
        default='work_dirs/demo',
        help='where logs, checkpoints, results go (default: %(default)s)')
    parser.add_argument(
        '--data-root',
        help='dataset folder (default: data/demo, or WORK_DIR/data with '
        '--quick)')
    parser.add_argument(
        '--seed', type=int, default=0, help='dataset seed (default: 0)')
    parser.add_argument(
        '--norm',
        choices=('cbn', 'bn', 'gn'),
        default='cbn',
        help='which variant of the demo configs to run (default: cbn)')
    parser.add_argument(
        '--tasks',
        nargs='+',
        choices=('det', 'seg'),
        default=['det', 'seg'],
        help='tasks to run (default: both)')
    return parser.parse_args(argv)


class StepFailed(RuntimeError):
    pass


def _run(step: str, cmd: List[str], env: Dict[str, str]) -> float:
    """Run a tool in a subprocess, its output going to ours; seconds taken."""
    print(f'\n==> {step}\n    $ {" ".join(cmd)}', flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=os.getcwd(), env=env)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise StepFailed(f'{step} failed (exit status {proc.returncode}); '
                         'see the log above')
    print(f'==> {step}: done in {took:.0f} s', flush=True)
    return took


def _tool(name: str) -> str:
    return osp.join(REPO, 'tools', name)


def _config(pattern: str, norm: str) -> str:
    return osp.join(REPO, pattern.format(norm=norm))


def _last_checkpoint(work_dir: str) -> str:
    """The checkpoint mmengine's CheckpointHook saved last in ``work_dir``."""
    marker = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(marker):
        with open(marker) as f:
            path = f.read().strip()
        if osp.isfile(path):
            return path
    ckpts = sorted(glob.glob(osp.join(work_dir, '*.pth')), key=osp.getmtime)
    if not ckpts:
        raise StepFailed(f'no checkpoint in {work_dir}')
    return ckpts[-1]


def read_test_metrics(work_dir: str) -> dict:
    """The metrics of the newest test run in ``work_dir``.

    mmengine's LoggerHook writes them as one json line into
    ``WORK_DIR/<timestamp>/<timestamp>.json`` after the test epoch.
    """
    logs = sorted(
        glob.glob(osp.join(work_dir, '*', '*.json')), key=osp.getmtime)
    for path in reversed(logs):
        with open(path) as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        for line in reversed(lines):
            record = json.loads(line)
            if any(k in record for k in DET_METRICS + SEG_METRICS):
                return dict(record, json_log=path)
    raise StepFailed(f'no evaluation results in the json logs under '
                     f'{work_dir}')


def _data_options(task: str, data_root: str, stage: str) -> List[str]:
    """Point the ``train`` or ``test`` dataloader at ``data_root``."""
    root = osp.join(data_root, 'coco' if task == 'det' else 'seg') + '/'
    opts = [f'{stage}_dataloader.dataset.data_root={root}']
    if task == 'det' and stage == 'test':
        ann = osp.join(root, 'annotations', 'instances_val.json')
        opts.append(f'test_evaluator.ann_file={ann}')
    return opts


def _quick_test_options(task: str, quick: bool) -> List[str]:
    # after a few iterations every score may be under 0.05: keep them all,
    # so that the quick run still exercises the whole evaluation
    return ['model.test_cfg.rcnn.score_thr=0.0'] if quick and \
        task == 'det' else []


def _schedule_options(task: str, quick: bool, norm: str) -> List[str]:
    opts = list(NO_VAL)
    if task == 'det':
        if quick:
            opts += [
                f'train_cfg.max_epochs={QUICK_DET_EPOCHS}',
                f'default_hooks.checkpoint.interval={QUICK_DET_EPOCHS}',
                'default_hooks.logger.interval=2'
            ]
        return opts
    if quick:
        opts += [
            f'train_cfg.max_iters={QUICK_SEG_ITERS}',
            f'default_hooks.checkpoint.interval={QUICK_SEG_ITERS}',
            'default_hooks.logger.interval=2'
        ]
        if norm == 'cbn':
            opts += [
                f'model.{part}.norm_cfg.burnin={QUICK_SEG_BURNIN}'
                for part in ('backbone', 'decode_head', 'auxiliary_head')
            ]
    return opts


def run_task(task: str, args, data_root: str, env: Dict[str, str]) -> dict:
    """Train, test and (maybe) export one task; its summary entry."""
    pattern = DET_CONFIG if task == 'det' else SEG_CONFIG
    config = _config(pattern, args.norm)
    work_dir = osp.join(args.work_dir, task)
    test_dir = osp.join(work_dir, 'test')
    name = 'detection (Mask R-CNN)' if task == 'det' else \
        'segmentation (FCN)'

    train_cmd = [
        sys.executable,
        _tool('train.py'), config, '--work-dir', work_dir, '--cfg-options'
    ] + _data_options(task, data_root, 'train') + _schedule_options(
        task, args.quick, args.norm)
    train_s = _run(f'train {name}', train_cmd, env)
    ckpt = _last_checkpoint(work_dir)

    out = osp.join(test_dir, 'results.pkl' if task == 'det' else 'pred')
    test_cmd = [
        sys.executable,
        _tool('test.py'), config, ckpt, '--work-dir', test_dir, '--out', out,
        '--cfg-options'
    ] + _data_options(task, data_root, 'test') + _quick_test_options(
        task, args.quick)
    test_s = _run(f'test {name}', test_cmd, env)
    metrics = read_test_metrics(test_dir)
    keys = DET_METRICS if task == 'det' else SEG_METRICS
    entry = dict(
        config=osp.relpath(config),
        work_dir=work_dir,
        checkpoint=ckpt,
        results=out,
        test_log=metrics.pop('json_log'),
        train_seconds=round(train_s, 1),
        test_seconds=round(test_s, 1),
        metrics={k: metrics[k]
                 for k in keys if k in metrics})

    if osp.isfile(_tool('publish_model.py')):
        export_dir = osp.join(args.work_dir, 'export', task)
        entry['export_dir'] = export_dir
        entry['exported'] = export_task(name, ckpt, config, export_dir, env)
    return entry


def export_task(name: str, ckpt: str, config: str, export_dir: str,
                env: Dict[str, str]) -> List[str]:
    """Export a task's checkpoint with ``tools/publish_model.py``; the
    files in ``export_dir``.

    The export of an earlier demo run in the same work dir is the demo's
    own output: it is replaced as a whole (its checkpoint name holds a hash
    of other weights), and the log says so, so that ``make demo`` runs
    again in a checkout where it ran before. The new export is written
    beside it and swapped in by renames: an interrupted run leaves one
    complete export or the other.
    """
    staged = export_dir + '.new'
    shutil.rmtree(staged, ignore_errors=True)
    _run(f'export {name}', [
        sys.executable,
        _tool('publish_model.py'), ckpt, staged, '--config', config
    ], env)
    if osp.isdir(export_dir):
        print(f'demo: {_show(export_dir)} held the export of an earlier '
              'demo run; replaced', flush=True)
        retired = export_dir + '.old'
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(export_dir, retired)
        os.replace(staged, export_dir)
        shutil.rmtree(retired)
    else:
        os.replace(staged, export_dir)
    return sorted(os.listdir(export_dir))


def _show(path: str) -> str:
    """``path`` relative to the current directory when it lies below it."""
    rel = osp.relpath(path)
    return path if rel.startswith('..') else rel


def print_summary(summary: dict) -> None:
    print('\n' + '=' * 72)
    mode = 'quick ' if summary['quick'] else ''
    print(f'mmcbn {mode}demo ({summary["norm"].upper()}) finished in '
          f'{summary["total_seconds"]:.0f} s')
    print(f'  data: {_show(summary["data_root"])}')
    labels = {
        'coco/bbox_mAP': 'bbox mAP',
        'coco/bbox_mAP_50': 'bbox mAP@50',
        'coco/segm_mAP': 'segm mAP',
        'coco/segm_mAP_50': 'segm mAP@50',
        'mIoU': 'mIoU (%)',
        'mAcc': 'mAcc (%)',
        'aAcc': 'aAcc (%)'
    }
    for task, entry in summary['tasks'].items():
        print(f'  {task}: {entry["config"]}')
        print(f'    train {entry["train_seconds"]:.0f} s, test '
              f'{entry["test_seconds"]:.0f} s')
        values = ', '.join(
            f'{labels.get(k, k)} ' +
            (f'{v:.3f}' if k.startswith('coco/') else f'{v:.2f}')
            for k, v in entry['metrics'].items())
        print(f'    {values}')
        print(f'    logs and checkpoints: {_show(entry["work_dir"])}')
        print(f'    checkpoint: {_show(entry["checkpoint"])}')
        print(f'    test log: {_show(entry["test_log"])}')
        print(f'    predictions: {_show(entry["results"])}')
        if 'export_dir' in entry:
            print(f'    exported: {_show(entry["export_dir"])} '
                  f'({", ".join(entry["exported"])})')
    print(f'  summary: {_show(summary["summary_file"])}')
    print('=' * 72)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    sizes = QUICK_DATA if args.quick else FULL_DATA
    data_root = args.data_root or (osp.join(args.work_dir, 'data')
                                   if args.quick else 'data/demo')
    env = dict(os.environ)
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

    print(f'==> data: {data_root}', flush=True)
    if make_demo_data.is_generated(data_root, args.seed, **sizes):
        print(
            f'    already generated (seed {args.seed}, '
            f'{sizes["num_train"]} train + {sizes["num_val"]} val images, '
            f'{sizes["size"]}x{sizes["size"]}): skipped',
            flush=True)
    else:
        make_demo_data.generate(data_root, args.seed, **sizes)

    os.makedirs(args.work_dir, exist_ok=True)
    summary = dict(
        quick=args.quick,
        norm=args.norm,
        data_root=data_root,
        work_dir=args.work_dir,
        summary_file=osp.join(args.work_dir, 'summary.json'),
        tasks={})
    try:
        for task in args.tasks:
            summary['tasks'][task] = run_task(task, args, data_root, env)
    except StepFailed as e:
        sys.exit(f'demo: {e}')
    summary['total_seconds'] = round(time.perf_counter() - start, 1)
    bad = [
        f'{task}: {k}={v}' for task, entry in summary['tasks'].items()
        for k, v in entry['metrics'].items()
        if not isinstance(v, (int, float)) or not math.isfinite(v)
    ]
    with open(summary['summary_file'], 'w') as f:
        json.dump(summary, f, indent=1)
    print_summary(summary)
    if bad:
        sys.exit(f'demo: non-finite metrics: {", ".join(bad)}')
    return summary


if __name__ == '__main__':
    main()
