# Faster R-CNN R50-FPN, COCO detection, 1x schedule, 2 images per GPU, with
# SyncCBN in the FPN and the 4conv1fc box head: statistics pooled over the
# GPUs *and* the last 4 iterations (effective batch = 4 x GPUs x 2 images).
# Launch it distributed (tools/dist_train.sh CONFIG NGPUS); in a single
# process it is CBN.
#
# Differs from faster-rcnn_r50_fpn_cbn-neck-head_1x_coco.py in the norm type
# only (window 4, burn-in 3 of 12 epochs, as the CBN paper).
_base_ = './faster-rcnn_r50_fpn_cbn-neck-head_1x_coco.py'

norm_cfg = dict(
    type='SyncCBN', window=4, burnin=3, burnin_by_epoch=True,
    requires_grad=True)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
