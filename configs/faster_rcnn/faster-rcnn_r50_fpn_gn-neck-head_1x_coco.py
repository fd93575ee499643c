# Baseline for faster-rcnn_r50_fpn_cbn-neck-head_1x_coco.py: Faster R-CNN
# R50-FPN, COCO detection, 1x schedule, 2 images per GPU, with GN with 32
# groups in the FPN and the 4conv1fc box head. The backbone keeps mmdet's
# frozen BN (norm_eval=True, frozen_stages=1). Everything else as in the CBN
# config.
_base_ = '../_base_/faster-rcnn_r50_fpn_4conv1fc_neck-head_1x_coco.py'

norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
