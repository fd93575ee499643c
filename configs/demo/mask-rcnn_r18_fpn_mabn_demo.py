# Demo baseline: mask-rcnn_r18_fpn_cbn_demo.py with MABN (Yan et al., ICLR
# 2020) behind weight-centred convolutions (ConvWC) instead of CBN, the
# paper's recipe, in every part that has CBN. Everything else is identical,
# for accuracy comparisons on the synthetic demo data.
#
# MABN's settings for the demo's 600 iterations at 2 images: moving
# averages over 16 iterations (= 32 / 2), the batch's own statistics for
# the first 100 iterations, the renormalization factor r after 240 (40% of
# the schedule, as 1000 of MABN's ~2500-iteration photo runs).
_base_ = './mask-rcnn_r18_fpn_cbn_demo.py'

norm_cfg = dict(
    _delete_=True,
    type='MABN',
    buffer_size=16,
    sma_warmup=100,
    renorm_warmup=240,
    requires_grad=True)
conv_cfg = dict(type='ConvWC')
model = dict(
    backbone=dict(norm_cfg=norm_cfg, conv_cfg=conv_cfg),
    neck=dict(norm_cfg=norm_cfg, conv_cfg=conv_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=norm_cfg, conv_cfg=conv_cfg),
        mask_head=dict(norm_cfg=norm_cfg, conv_cfg=conv_cfg)))
custom_hooks = []
