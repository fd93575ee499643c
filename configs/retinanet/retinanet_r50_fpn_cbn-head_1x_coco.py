# RetinaNet R50-FPN, COCO detection, 1x schedule, 2 images per GPU, with
# Cross-Iteration BN after each of the 4 convs of the classification and
# regression towers of the shared RetinaHead. The towers run once per FPN level
# (5 times per iteration): with CBNHook each CBN layer keeps one window per
# call position, i.e. per level. Backbone BN frozen (norm_eval=True) and FPN
# unnormalized, as in mmdet's base.
#
# Settings of the CBN paper for this setup: window k=4, burn-in 3 of the 12
# epochs (burnin_by_epoch=True; CBNHook converts it to iterations with the
# train dataloader's length, so it follows the number of GPUs).
#
# Baseline differing only in the norm: retinanet_r50_fpn_bn-head_1x_coco.py.
_base_ = [
    '../_base_/retinanet_r50_fpn_head_1x_coco.py', '../_base_/cbn_runtime.py'
]

norm_cfg = dict(
    type='CBN', window=4, burnin=3, burnin_by_epoch=True, requires_grad=True)
model = dict(bbox_head=dict(norm_cfg=norm_cfg))
