# Copyright (c) mmcbn contributors. All rights reserved.
"""Publish a CBN checkpoint for users of stock mmdet/mmseg.

Writes into OUT_DIR a standalone BN config and a checkpoint holding only
``meta`` and ``state_dict``, named like mmdet's publish tool does::

    OUT_DIR/<config name>.py
    OUT_DIR/<config name>-<first 8 hex digits of sha256>.pth

Before anything is written, the exported model is built with the stock
codebase and the weights are loaded into it strictly. Files are written to
a temporary name and renamed (atomic); the input is never overwritten and
an existing output only with ``--force``.

Example::

    python tools/publish_model.py work_dirs/x/epoch_12.pth zoo/ \\
        --config configs/mmdet/faster-rcnn_r50_fpn_cbn_1x_coco.py
"""
import argparse
import hashlib
import os
import os.path as osp
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmcbn.checkpoint import CheckpointError  # noqa: E402


class PublishError(RuntimeError):
    """Publishing cannot go on; the message is one line."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Export a CBN checkpoint as a plain BN model')
    parser.add_argument('in_file', help='input checkpoint (training run)')
    parser.add_argument('out_dir', help='directory for config + checkpoint')
    parser.add_argument(
        '--config', required=True, help='the config the model was trained '
        'with')
    parser.add_argument(
        '--force', action='store_true',
        help='replace existing outputs of the same name')
    return parser.parse_args(argv)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _verify_loads(cfg, state_dict) -> None:
    """Build the exported model with the stock codebase; load strictly."""
    from mmengine.registry import DefaultScope, init_default_scope
    from mmengine.registry import MODELS
    scope = cfg.get('default_scope')
    if scope is not None:
        init_default_scope(scope)
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(cfg.model)
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise PublishError(
            'the weights do not fit the exported BN model: missing '
            f'{result.missing_keys[:5]}, unexpected '
            f'{result.unexpected_keys[:5]}')


def publish(in_file: str, out_dir: str, config: str,
            force: bool = False) -> tuple:
    """Export ``in_file``; returns (config path, checkpoint path)."""
    import torch
    from mmengine.config import Config

    from mmcbn.checkpoint import load_checkpoint_file
    from mmcbn.export import dropped_keys, export_checkpoint, export_config

    ckpt = load_checkpoint_file(in_file)
    if 'state_dict' not in ckpt:
        raise PublishError(f'{in_file}: no state_dict in the checkpoint '
                           f'(keys: {sorted(ckpt)})')
    cfg = export_config(Config.fromfile(config))
    published = export_checkpoint(ckpt, cfg)
    _verify_loads(cfg, published['state_dict'])

    os.makedirs(out_dir, exist_ok=True)
    name = osp.splitext(osp.basename(config))[0]
    cfg_path = osp.join(out_dir, name + '.py')
    if osp.exists(cfg_path) and not force:
        raise PublishError(f'{cfg_path} exists; use --force to replace it')
    # Write under fixed names in a private directory of OUT_DIR (torch.save
    # puts the file name into the archive, so the content stays the same
    # for the same input), then rename: same filesystem, atomic.
    staging = tempfile.mkdtemp(prefix='.publish-', dir=out_dir)
    try:
        tmp_ckpt = osp.join(staging, name + '.pth')
        tmp_cfg = osp.join(staging, name + '.py')
        torch.save(published, tmp_ckpt)
        ckpt_path = osp.join(out_dir, f'{name}-{_sha256(tmp_ckpt)[:8]}.pth')
        if osp.realpath(ckpt_path) == osp.realpath(in_file):
            raise PublishError(f'{ckpt_path} is the input checkpoint; '
                               'choose another OUT_DIR')
        if osp.exists(ckpt_path) and not force:
            raise PublishError(
                f'{ckpt_path} exists; use --force to replace it')
        cfg.dump(tmp_cfg)
        os.replace(tmp_cfg, cfg_path)
        os.replace(tmp_ckpt, ckpt_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    dropped = dropped_keys(ckpt)
    return cfg_path, ckpt_path, dropped


def main(argv=None) -> int:
    args = parse_args(argv)
    if osp.realpath(args.out_dir) == osp.realpath(args.in_file):
        print(f'error: OUT_DIR {args.out_dir} is the input file',
              file=sys.stderr)
        return 1
    try:
        cfg_path, ckpt_path, dropped = publish(args.in_file, args.out_dir,
                                               args.config, args.force)
    except (CheckpointError, PublishError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    if dropped:
        print(f'dropped from the checkpoint: {", ".join(dropped)}')
    print(f'config: {cfg_path}')
    print(f'checkpoint: {ckpt_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
