# Shared part (not a full config) of the DeepLabV3+ norm comparison on
# ADE20K: DeepLabV3+ R50-D8 (ResNetV1c), 512x512 crops, 80k-iteration
# schedule, with the norm in the backbone (trained, norm_eval=False), the
# DeepLabV3+ head (ASPP with image pooling, depthwise-separable convs,
# low-level bottleneck) and the auxiliary FCN head: mmseg's placement (SyncBN
# there). Unlike mmseg's 4xb4 ADE20K base it trains with 2 crops per GPU
# (4xb2, the small per-GPU batch CBN is meant for); learning rate and
# schedule are mmseg's.
#
# The normalized positions are marked with a placeholder norm type that
# nothing registers: every configs/deeplabv3plus/*_ade20k-* file must set its
# own norm_cfg at each of them (a forgotten one fails to build), so the CBN
# config and its BN/GN/SyncBN baselines differ only in the norm.
_base_ = ('mmseg::deeplabv3plus/'
          'deeplabv3plus_r50-d8_4xb4-80k_ade20k-512x512.py')

# Placeholder: each norm-specific child replaces it and sets every field.
norm_cfg = dict(type='NormSetByEachConfig')
model = dict(
    backbone=dict(norm_cfg=norm_cfg, norm_eval=False),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
train_dataloader = dict(batch_size=2)  # 2 crops per GPU (mmseg's base: 4)
