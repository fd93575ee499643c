# Baseline for retinanet_r50_fpn_cbn-head_1x_coco.py: RetinaNet R50-FPN, COCO
# detection, 1x schedule, 2 images per GPU, with plain BN after each conv of
# the shared RetinaHead towers (BN layers shared over the FPN levels).
# Everything else as in the CBN config.
#
# BN normalizes with the statistics of the 2 images of one GPU.
_base_ = '../_base_/retinanet_r50_fpn_head_1x_coco.py'

norm_cfg = dict(type='BN', requires_grad=True)
model = dict(bbox_head=dict(norm_cfg=norm_cfg))
