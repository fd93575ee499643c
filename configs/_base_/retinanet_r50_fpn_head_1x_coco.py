# Shared part (not a full config) of the RetinaNet norm comparison with
# normalization in the shared head: RetinaNet R50-FPN, COCO, 1x schedule
# (12 epochs), 2 images per GPU, with a norm after each of the 4 convs of the
# classification and regression towers (RetinaHead's norm_cfg). The towers
# are shared over the 5 FPN levels, so each norm layer runs 5 times per
# iteration; with CBNHook a CBN layer keeps one window per call position,
# i.e. per level. Backbone BN frozen (norm_eval=True) and FPN unnormalized,
# as in mmdet's base.
#
# Every configs/retinanet/*-head_* file sets its own norm_cfg at the position
# marked with the placeholder.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

# Placeholder: each norm-specific child replaces it and sets every field.
norm_cfg = dict(type='NormSetByEachConfig')
model = dict(bbox_head=dict(norm_cfg=norm_cfg))
train_dataloader = dict(batch_size=2)  # 2 images per GPU (as the base)
