# Baseline for mask-rcnn_r50_fpn_cbn-neck-head_1x_coco.py: Mask R-CNN R50-FPN,
# COCO instance segmentation, 1x schedule, 2 images per GPU, with SyncBN in the
# FPN and the 4conv1fc box and 4conv mask heads. The backbone keeps mmdet's
# frozen BN (norm_eval=True, frozen_stages=1). Everything else as in the CBN
# config.
#
# SyncBN is mmcv's 'SyncBN' type (torch.nn.SyncBatchNorm): statistics over the
# images of all GPUs. It is the multi-GPU baseline: launch it distributed (a
# launcher such as torchrun with --launcher pytorch); without a process group
# torch falls back to per-GPU statistics, i.e. plain BN.
_base_ = '../_base_/mask-rcnn_r50_fpn_4conv1fc_neck-head_1x_coco.py'

norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
