# Demo baseline: mask-rcnn_r18_fpn_cbn_demo.py with BatchNorm instead of CBN
# (statistics of the current 2 images only). Everything else is identical,
# for accuracy comparisons on the synthetic demo data.
_base_ = './mask-rcnn_r18_fpn_cbn_demo.py'

norm_cfg = dict(_delete_=True, type='BN', requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
custom_hooks = []
