# Baseline for mask-rcnn_r50_fpn_cbn-all_1x_coco.py: Mask R-CNN R50-FPN, COCO
# instance segmentation, 1x schedule, 2 images per GPU, with plain BN in the
# ResNet-50 backbone, the FPN and the 4conv1fc box and 4conv mask heads. The
# backbone norm trains (norm_eval=False); frozen_stages=1 is kept, so the stem
# and stage 1 stay frozen, in eval mode. Everything else as in the CBN config.
#
# BN normalizes with the statistics of the 2 images of one GPU.
_base_ = '../_base_/mask-rcnn_r50_fpn_4conv1fc_all_1x_coco.py'

norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
