# Copyright (c) mmcbn contributors. All rights reserved.
"""Stock mmdet/mmseg models with a chosen norm, deterministic batches and a
few SGD steps, shared by the model-level tests."""
import copy

import torch
from mmengine.hub import get_config
from mmengine.registry import DefaultScope

import mmcbn  # noqa: F401
from mm_batches import det_batch, seg_batch  # noqa: F401
from mmcbn import set_cbn_iteration

CBN_CFG = dict(type='CBN', window=3, burnin=1)
STEPS = 3


FASTER_RCNN = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
PSPNET = 'mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py'


def faster_rcnn_cfg(norm_cfg, norm_eval=False, frozen_stages=1):
    cfg = get_config(FASTER_RCNN)
    model = cfg.model
    model.backbone.update(
        norm_cfg=norm_cfg, norm_eval=norm_eval, frozen_stages=frozen_stages,
        init_cfg=None)
    model.neck.norm_cfg = norm_cfg
    model.roi_head.bbox_head.update(
        type='Shared4Conv1FCBBoxHead', conv_out_channels=64,
        fc_out_channels=128, norm_cfg=norm_cfg)
    # keep CPU time small: fewer proposals and sampled RoIs
    model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    model.train_cfg.rcnn.sampler.num = 32
    return model


def pspnet_cfg(norm_cfg, norm_eval=False):
    cfg = get_config(PSPNET)
    model = cfg.model
    model.pretrained = None
    model.data_preprocessor.size = (64, 64)
    model.backbone.update(norm_cfg=norm_cfg, norm_eval=norm_eval)
    model.decode_head.update(norm_cfg=norm_cfg, channels=64)
    model.auxiliary_head.update(norm_cfg=norm_cfg, channels=32)
    return model


def build(scope, model_cfg):
    import importlib
    registry = importlib.import_module(f'{scope}.registry')
    importlib.import_module(f'{scope}.utils').register_all_modules(False)
    with DefaultScope.overwrite_default_scope(scope):
        torch.manual_seed(0)
        model = registry.MODELS.build(copy.deepcopy(model_cfg))
    model.init_weights()
    return model


def train_steps(model, make_batch, steps=STEPS):
    from mmengine.optim import OptimWrapper
    wrapper = OptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9))
    model.train()
    losses = []
    for step in range(steps):
        set_cbn_iteration(model, step)
        log_vars = model.train_step(make_batch(step), wrapper)
        losses.append(float(log_vars['loss']))
    return losses


def full_config(base, model_cfg, cbn=True):
    """A whole runner config: ``base`` with ``model_cfg``, set up for CBN."""
    cfg = get_config(base)
    cfg.model = model_cfg
    if cbn:
        cfg.custom_imports = dict(imports=['mmcbn'],
                                  allow_failed_imports=False)
        cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [
            dict(type='CBNHook')
        ]
    return cfg
