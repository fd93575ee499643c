# Baseline for faster-rcnn_r50_fpn_cbn-all_1x_coco.py: Faster R-CNN R50-FPN,
# COCO detection, 1x schedule, 2 images per GPU, with SyncBN in the ResNet-50
# backbone, the FPN and the 4conv1fc box head. The backbone norm trains
# (norm_eval=False); frozen_stages=1 is kept, so the stem and stage 1 stay
# frozen, in eval mode. Everything else as in the CBN config.
#
# SyncBN is mmcv's 'SyncBN' type (torch.nn.SyncBatchNorm): statistics over the
# images of all GPUs. It is the multi-GPU baseline: launch it distributed (a
# launcher such as torchrun with --launcher pytorch); without a process group
# torch falls back to per-GPU statistics, i.e. plain BN.
_base_ = '../_base_/faster-rcnn_r50_fpn_4conv1fc_all_1x_coco.py'

norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
