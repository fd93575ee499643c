# Copyright (c) mmcbn contributors. All rights reserved.
"""Test (evaluate) an mmdet or mmseg model from a config and a checkpoint.

The command line is mmdet's ``tools/test.py``; the codebase is picked from
the config's ``default_scope``. Examples::

    python tools/test.py CONFIG work_dirs/x/epoch_12.pth
    python tools/test.py CONFIG CKPT --show-dir vis --out results.pkl
    bash tools/dist_test.sh CONFIG CKPT 8
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mmcbn  # noqa: E402,F401  (CBN, safe checkpoint loading)
from mmcbn.runner_setup import (add_common_args,  # noqa: E402
                                apply_common_args,
                                config_scope)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir',
        help='the directory to save the file containing evaluation metrics')
    parser.add_argument(
        '--out',
        type=str,
        help='detection: dump predictions to this pickle file; '
        'segmentation: save predicted label maps into this directory')
    parser.add_argument(
        '--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir',
        help='directory where painted images will be saved. If specified, '
        'it will be automatically saved to the work_dir/timestamp/show_dir')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument('--tta', action='store_true')
    add_common_args(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def _visualize_segmentation(cfg, args) -> None:
    hooks = cfg.default_hooks
    if 'visualization' not in hooks:
        raise RuntimeError('--show/--show-dir need default_hooks.'
                           "visualization=dict(type='SegVisualizationHook')")
    hooks.visualization.draw = True
    if args.show:
        hooks.visualization.show = True
        hooks.visualization.wait_time = args.wait_time
    if args.show_dir:
        cfg.visualizer.save_dir = args.show_dir


def _apply_tta(cfg) -> None:
    if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
        raise ValueError('--tta needs tta_model and tta_pipeline in the '
                         'config')
    cfg.model = dict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def main(argv=None) -> None:
    from mmengine.config import Config
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    # --out and --show-dir work the mmdet or the mmseg way
    scope = config_scope(cfg) if (args.out or args.show
                                  or args.show_dir) else cfg.get(
                                      'default_scope')
    apply_common_args(
        cfg,
        config_path=args.config,
        launcher=args.launcher,
        work_dir=args.work_dir,
        cfg_options=args.cfg_options)
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'{args.checkpoint}: no such checkpoint')
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        if scope == 'mmdet':
            from mmdet.engine.hooks.utils import trigger_visualization_hook
            cfg = trigger_visualization_hook(cfg, args)
        else:
            _visualize_segmentation(cfg, args)
    if args.tta:
        _apply_tta(cfg)
    if scope == 'mmseg' and args.out is not None:
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True
    if 'runner_type' in cfg:
        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    if scope == 'mmdet' and args.out is not None:
        from mmdet.evaluation import DumpDetResults
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError('--out must be a .pkl file for detection')
        runner.test_evaluator.metrics.append(
            DumpDetResults(out_file_path=args.out))
    runner.test()


if __name__ == '__main__':
    main()
