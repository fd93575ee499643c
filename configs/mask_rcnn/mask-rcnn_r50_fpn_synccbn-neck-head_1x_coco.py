# Mask R-CNN R50-FPN, COCO, 1x schedule, 2 images per GPU, with SyncCBN in the
# FPN, the 4conv1fc box head and the mask head: statistics pooled over the
# GPUs *and* the last 4 iterations. Launch it distributed
# (tools/dist_train.sh CONFIG NGPUS); in a single process it is CBN.
#
# Differs from mask-rcnn_r50_fpn_cbn-neck-head_1x_coco.py in the norm type
# only.
_base_ = './mask-rcnn_r50_fpn_cbn-neck-head_1x_coco.py'

norm_cfg = dict(
    type='SyncCBN', window=4, burnin=3, burnin_by_epoch=True,
    requires_grad=True)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
