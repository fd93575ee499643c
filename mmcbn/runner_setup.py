# Copyright (c) mmcbn contributors. All rights reserved.
"""Turn the command-line options of ``tools/train.py``/``tools/test.py``
into an mmengine config, the way mmdet's and mmseg's tools do, and make the
distributed launchers work on machines without CUDA.

mmengine 0.10.7's ``pytorch`` launcher calls ``torch.cuda.set_device`` and
wraps the model with ``device_ids=[LOCAL_RANK]``; both fail on CPU. Without
CUDA, :func:`setup_distributed` creates the process group itself with the
``gloo`` backend (the runner then skips its own initialization) and asks for
a CPU ``MMDistributedDataParallel``. With CUDA nothing changes: the runner
initializes NCCL as usual.
"""
import os
import os.path as osp
from typing import Optional

import torch
import torch.distributed as torch_dist
from mmengine.config import Config, DictAction  # noqa: F401 (re-exported)

#: Scopes the tools know, from the config's ``default_scope``.
KNOWN_SCOPES = ('mmdet', 'mmseg')


def config_scope(cfg: Config) -> str:
    """The codebase a config belongs to, from its ``default_scope``, for
    options that work differently in mmdet and mmseg.

    Raises:
        ValueError: If the scope is missing or neither mmdet nor mmseg.
    """
    scope = cfg.get('default_scope')
    if scope not in KNOWN_SCOPES:
        raise ValueError(
            f'config {cfg.filename} has default_scope={scope!r}; mmcbn tools '
            f'support {" and ".join(KNOWN_SCOPES)} configs')
    return scope


def add_common_args(parser) -> None:
    """The options tools/train.py and tools/test.py share with mmdet's."""
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, xxx=yyy format')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def default_work_dir(config_path: str) -> str:
    """``./work_dirs/<config name>``, as mmdet's tools choose it."""
    return osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])


def apply_common_args(cfg: Config, *, config_path: str, launcher: str,
                      work_dir: Optional[str],
                      cfg_options: Optional[dict]) -> Config:
    """Options shared by training and testing, in mmdet's precedence:
    ``--cfg-options`` over the file, ``--work-dir`` over both."""
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = default_work_dir(config_path)
    if launcher != 'none':
        setup_distributed(cfg, launcher)
    return cfg


def enable_amp(cfg: Config) -> None:
    """Mixed precision, as mmdet's ``--amp``.

    With CUDA: ``AmpOptimWrapper`` with a dynamic loss scale. Without:
    :class:`mmcbn.optim.CPUAutocastOptimWrapper` (bfloat16 autocast), since
    mmengine's wrapper refuses to run on CPU.
    """
    wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if wrapper in ('AmpOptimWrapper', 'CPUAutocastOptimWrapper'):
        return
    if wrapper != 'OptimWrapper':
        raise ValueError(f'--amp needs optim_wrapper.type OptimWrapper, got '
                         f'{wrapper!r} in the config')
    if torch.cuda.is_available():
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    else:
        cfg.optim_wrapper.type = 'CPUAutocastOptimWrapper'


def apply_resume(cfg: Config, resume: Optional[str]) -> None:
    """``--resume`` (latest checkpoint in the work dir) or ``--resume PATH``."""
    if resume == 'auto':
        # the newest *complete* checkpoint: never one torn by a process
        # killed while writing it (mmengine would follow last_checkpoint)
        from .checkpoint import find_latest_complete_checkpoint
        cfg.resume = True
        cfg.load_from = find_latest_complete_checkpoint(cfg.work_dir)
    elif resume is not None:
        if not osp.isfile(resume):
            raise FileNotFoundError(f'--resume {resume}: no such checkpoint')
        cfg.resume = True
        cfg.load_from = resume


def setup_distributed(cfg: Config, launcher: str) -> None:
    """Make ``--launcher pytorch`` work without CUDA (gloo, CPU DDP)."""
    if torch.cuda.is_available() or launcher != 'pytorch':
        return
    if not torch_dist.is_initialized():
        for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                    'MASTER_PORT'):
            if var not in os.environ:
                raise RuntimeError(
                    f'--launcher pytorch needs ${var}: start the script with '
                    'torchrun (tools/dist_train.sh, tools/dist_test.sh)')
        torch_dist.init_process_group(backend='gloo')
    cfg.merge_from_dict({'env_cfg.dist_cfg.backend': 'gloo'})
    wrapper = cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel',
        broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper['device_ids'] = None  # a CPU module takes no device ids
    cfg.model_wrapper_cfg = wrapper
