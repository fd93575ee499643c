# Shared part (not a full config) of the Faster R-CNN norm comparison with
# normalization in the neck and the box head, the placement of the CBN paper:
# R50-FPN, 4conv1fc box head (mmdet's Shared4Conv1FCBBoxHead, as in its GN
# configs), COCO, 1x schedule (12 epochs), 2 images per GPU; the backbone
# keeps mmdet's frozen BN (norm_eval=True, frozen_stages=1).
#
# The normalized positions are marked with a placeholder norm type that
# nothing registers: every configs/faster_rcnn/*-neck-head_* file must set
# its own norm_cfg at each of them (a forgotten one fails to build), so the
# CBN config and its BN/GN/SyncBN baselines differ only in the norm.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

# Placeholder: each norm-specific child replaces it and sets every field.
norm_cfg = dict(type='NormSetByEachConfig')
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            conv_out_channels=256,
            norm_cfg=norm_cfg)))
train_dataloader = dict(batch_size=2)  # 2 images per GPU (as the base)
