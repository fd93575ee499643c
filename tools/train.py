# Copyright (c) mmcbn contributors. All rights reserved.
"""Train an mmdet or mmseg model (CBN or not) from a config.

The command line is mmdet's ``tools/train.py``; the codebase is picked from
the config's ``default_scope``. Examples::

    python tools/train.py configs/mmdet/faster-rcnn_r50_fpn_cbn_1x_coco.py
    python tools/train.py CONFIG --resume              # latest in work dir
    python tools/train.py CONFIG --resume work_dirs/x/iter_100.pth
    bash tools/dist_train.sh CONFIG 8                  # 8 processes
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mmcbn  # noqa: E402,F401  (CBN, CBNHook, safe checkpoint loading)
from mmcbn.runner_setup import (add_common_args,  # noqa: E402
                                apply_common_args,
                                apply_resume, enable_amp)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a detector or a '
                                     'segmentor')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='enable automatic-mixed-precision training. On CPU this is '
        'bfloat16 autocast, meant as a correctness path, not as a speed-up: '
        'its speed depends on the CPU (the demo FCN trained about 13x '
        'slower than in float32 on an AMD EPYC without bf16 instructions, '
        '1.3-1.5x faster on an Intel Xeon with AVX512-BF16/AMX)')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='enable automatically scaling LR by the total batch size')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from the given checkpoint, or without a path from the '
        'latest checkpoint in the work directory')
    add_common_args(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main(argv=None) -> None:
    from mmengine.config import Config
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    apply_common_args(
        cfg,
        config_path=args.config,
        launcher=args.launcher,
        work_dir=args.work_dir,
        cfg_options=args.cfg_options)
    if args.amp:
        enable_amp(cfg)
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in \
                cfg.auto_scale_lr:
            raise ValueError('--auto-scale-lr needs auto_scale_lr='
                             'dict(base_batch_size=...) in the config')
        cfg.auto_scale_lr.enable = True
    apply_resume(cfg, args.resume)
    if 'runner_type' in cfg:
        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    runner.train()


if __name__ == '__main__':
    main()
