# Baseline for deeplabv3plus_r50-d8_cbn_4xb2-80k_ade20k-512x512.py: DeepLabV3+
# R50-D8, ADE20K, 512x512 crops, 2 crops per GPU, 80k iterations, with GN with
# 16 groups in the backbone (trained, norm_eval=False), the DeepLabV3+ head and
# the auxiliary FCN head. Everything else as in the CBN config.
#
# num_groups=16, not 32: the head's low-level bottleneck has c1_channels=48
# channels, which 32 groups do not divide (the stem's 32-channel convs and all
# other widths are multiples of 16).
#
# The backbone loads the same BN-pretrained ResNetV1c checkpoint as the other
# norms, so that only the norm differs. mmcv names the GN layers of the
# residual blocks gn1/gn2/gn3 where the checkpoint has bn1/bn2/bn3, so those
# start from GN's default scale 1 and shift 0 (mmengine reports them as missing
# keys); the convs and the index-named stem and downsample norms load.
_base_ = '../_base_/deeplabv3plus_r50-d8_4xb2-80k_ade20k-512x512.py'

norm_cfg = dict(type='GN', num_groups=16, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
