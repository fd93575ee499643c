# Mask R-CNN R50-FPN, COCO instance segmentation, 1x schedule, 2 images per
# GPU, with Cross-Iteration BN in the ResNet-50 backbone, the FPN and the
# 4conv1fc box and 4conv mask heads (the CBN paper's placement plus the
# backbone). The backbone norm trains (norm_eval=False); frozen_stages=1 is
# kept, so the stem and stage 1 stay frozen, in eval mode.
#
# Settings of the CBN paper for this setup: window k=4, burn-in 3 of the 12
# epochs (burnin_by_epoch=True; CBNHook converts it to iterations with the
# train dataloader's length, so it follows the number of GPUs).
#
# Baselines differing only in the norm: mask-rcnn_r50_fpn_bn-all_1x_coco.py,
# mask-rcnn_r50_fpn_gn-all_1x_coco.py, mask-rcnn_r50_fpn_syncbn-all_1x_coco.py.
_base_ = [
    '../_base_/mask-rcnn_r50_fpn_4conv1fc_all_1x_coco.py',
    '../_base_/cbn_runtime.py'
]

norm_cfg = dict(
    type='CBN', window=4, burnin=3, burnin_by_epoch=True, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
