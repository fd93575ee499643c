# Shared part (not a full config) of the Faster R-CNN norm comparison with
# normalization in the backbone too: the neck + box head placement of
# faster-rcnn_r50_fpn_4conv1fc_neck-head_1x_coco.py plus the ResNet-50
# backbone, whose norm now trains (norm_eval=False). frozen_stages=1 is kept:
# the stem and stage 1 stay frozen and in eval mode, as in mmdet's base.
# The backbone still starts from torchvision's BN checkpoint.
#
# Every configs/faster_rcnn/*-all_* file sets its own norm_cfg at each position
# marked with the placeholder (backbone, neck, box head).
_base_ = './faster-rcnn_r50_fpn_4conv1fc_neck-head_1x_coco.py'

# Placeholder: each norm-specific child replaces it and sets every field.
norm_cfg = dict(type='NormSetByEachConfig')
model = dict(backbone=dict(norm_cfg=norm_cfg, norm_eval=False))
