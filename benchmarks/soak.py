# Copyright (c) mmcbn contributors. All rights reserved.
"""Soak run: the demo Mask R-CNN (CBN) for several hundred iterations.

Trains ``configs/demo/mask-rcnn_r18_fpn_cbn_demo.py`` on freshly generated
demo data through mmengine's runner, with ``CBNHook`` (health metrics at
every log interval, window state in checkpoints) and a checkpoint every
epoch, and records after every iteration:

- the bytes of every CBN layer's window state (must be flat once the
  windows are full: no growth per iteration);
- the process's resident memory (VmRSS), whose growth over the second half
  of the run (a least-squares slope, KB per iteration) must stay small.

    python benchmarks/soak.py                # 600 iterations (300 images)
    python benchmarks/soak.py --quick        # 24 iterations, for the tests
    python benchmarks/soak.py --norm bn      # the control: BN demo config
"""
import os
import os.path as osp
import sys
import tempfile

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from common import (ROOT, Timer, benchmark_parser,  # noqa: E402
                    machine_info, markdown_table, save_png, write_json)

sys.path.insert(0, osp.join(ROOT, 'tools'))
CONFIG = osp.join(ROOT, 'configs', 'demo', 'mask-rcnn_r18_fpn_{}_demo.py')


def rss_kb() -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return -1


def slope(values):
    """Least-squares slope per step."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x)**2 for i in range(n))
    return num / den


def run(num_train: int, epochs: int, work_dir: str,
        norm: str = 'cbn') -> dict:
    import make_demo_data
    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    import mmcbn

    data = osp.join(work_dir, 'data')
    make_demo_data.generate(data, seed=0, num_train=num_train, num_val=2,
                            size=128, verbose=False)
    cfg = Config.fromfile(CONFIG.format(norm))
    cfg.work_dir = osp.join(work_dir, 'run')
    cfg.train_dataloader.dataset.data_root = osp.join(data, 'coco') + '/'
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    cfg.train_cfg.max_epochs = epochs
    cfg.train_cfg.val_interval = epochs + 1
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.default_hooks.checkpoint.interval = 1
    cfg.default_hooks.logger.interval = 10
    records = []

    class Probe(Hook):
        priority = 'LOWEST'

        def after_train_iter(self, runner, batch_idx, data_batch=None,
                             outputs=None):
            model = runner.model
            window = sum(layer.window_state_nbytes()
                         for _, layer in mmcbn.cbn_layers(model))
            records.append(dict(iter=runner.iter, window_bytes=window,
                                rss_kb=rss_kb()))

    runner = Runner.from_cfg(cfg)
    runner.register_hook(Probe())
    timer = Timer()
    runner.train()
    seconds = timer()
    layers = dict(mmcbn.cbn_layers(runner.model))
    if not layers:  # the BN control: no window
        for r in records:
            r['window_bytes'] = 0
    full_from = next(i for i, r in enumerate(records)
                     if r['window_bytes'] == records[-1]['window_bytes'])
    half = records[len(records) // 2:]
    return dict(
        iterations=len(records),
        cbn_layers=len(layers),
        seconds=seconds,
        window_state_final_from_iter=records[full_from]['iter'],
        window_mb_final=records[-1]['window_bytes'] / 2**20,
        window_bytes_changes_after_full=sum(
            1 for a, b in zip(records[full_from:], records[full_from + 1:])
            if a['window_bytes'] != b['window_bytes']),
        rss_mb_start=records[0]['rss_kb'] / 1024,
        rss_mb_end=records[-1]['rss_kb'] / 1024,
        rss_slope_kb_per_iter_second_half=slope(
            [r['rss_kb'] for r in half]),
        records=records)


def main(argv=None) -> dict:
    parser = benchmark_parser(__doc__, quick_help='24 iterations')
    parser.add_argument(
        '--norm', default='cbn', choices=['cbn', 'bn'],
        help='bn: the same run with the BN demo config (the control for '
        'memory growth that is not CBN\'s)')
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    num_train, epochs = (16, 3) if args.quick else (300, 4)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(num_train, epochs, tmp, args.norm)
    rows = [[result['iterations'], result['cbn_layers'],
             result['window_state_final_from_iter'],
             f'{result["window_mb_final"]:.2f}',
             result['window_bytes_changes_after_full'],
             f'{result["rss_mb_start"]:.0f}', f'{result["rss_mb_end"]:.0f}',
             f'{result["rss_slope_kb_per_iter_second_half"]:.1f}',
             f'{result["seconds"]:.0f}']]
    print(markdown_table(
        ['iterations', 'CBN layers', 'final window size from iter',
         'window state (MB)',
         'window-size changes after full', 'RSS start (MB)', 'RSS end (MB)',
         'RSS slope 2nd half (KB/iter)', 'time (s)'], rows))
    stem = 'soak' + ('' if args.norm == 'cbn' else '_bn') + (
        '_quick' if args.quick else '')
    write_json(osp.join(args.out, stem + '.json'),
               dict(benchmark='soak', machine=machine_info(),
                    quick=args.quick, norm=args.norm, **result))
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3))
    its = [r['iter'] for r in result['records']]
    ax.plot(its, [r['rss_kb'] / 1024 for r in result['records']],
            label='process RSS (MB)')
    ax.plot(its, [r['window_bytes'] / 2**20 for r in result['records']],
            label='CBN window state (MB)')
    ax.set_xlabel('iteration')
    ax.legend()
    fig.tight_layout()
    save_png(fig, osp.join(args.out, stem + '.png'))
    return result


if __name__ == '__main__':
    main()
