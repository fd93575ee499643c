# Baseline for deeplabv3plus_r50-d8_cbn_4xb2-80k_cityscapes-512x1024.py:
# DeepLabV3+ R50-D8, Cityscapes, 512x1024 crops, 2 crops per GPU, 80k
# iterations, with plain BN in the backbone (trained, norm_eval=False), the
# DeepLabV3+ head and the auxiliary FCN head. Everything else as in the CBN
# config.
#
# BN normalizes with the statistics of the 2 crops of one GPU.
_base_ = '../_base_/deeplabv3plus_r50-d8_4xb2-80k_cityscapes-512x1024.py'

norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
