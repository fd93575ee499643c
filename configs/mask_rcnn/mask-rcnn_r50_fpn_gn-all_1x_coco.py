# Baseline for mask-rcnn_r50_fpn_cbn-all_1x_coco.py: Mask R-CNN R50-FPN, COCO
# instance segmentation, 1x schedule, 2 images per GPU, with GN with 32 groups
# in the ResNet-50 backbone, the FPN and the 4conv1fc box and 4conv mask heads.
# The backbone norm trains (norm_eval=False); frozen_stages=1 is kept, so the
# stem and stage 1 stay frozen, in eval mode. Everything else as in the CBN
# config.
#
# The backbone loads the same torchvision BN checkpoint as the other norms, so
# that only the norm differs. mmcv names the GN layers gn1/gn2/gn3 where the
# checkpoint has bn1/bn2/bn3, so those start from GN's default scale 1 and
# shift 0 (mmengine reports them as missing keys); the convs and the
# index-named downsample norms load. mmdet's gn/ configs use a GN-pretrained
# backbone instead, but also change the preprocessing.
_base_ = '../_base_/mask-rcnn_r50_fpn_4conv1fc_all_1x_coco.py'

norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
