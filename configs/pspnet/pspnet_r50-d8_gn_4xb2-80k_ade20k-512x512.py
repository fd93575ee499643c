# Baseline for pspnet_r50-d8_cbn_4xb2-80k_ade20k-512x512.py: PSPNet R50-D8,
# ADE20K, 512x512 crops, 2 crops per GPU, 80k iterations, with GN with 32
# groups in the backbone (trained, norm_eval=False), the PSP head and the
# auxiliary FCN head. Everything else as in the CBN config.
#
# The backbone loads the same BN-pretrained ResNetV1c checkpoint as the other
# norms, so that only the norm differs. mmcv names the GN layers of the
# residual blocks gn1/gn2/gn3 where the checkpoint has bn1/bn2/bn3, so those
# start from GN's default scale 1 and shift 0 (mmengine reports them as missing
# keys); the convs and the index-named stem and downsample norms load.
_base_ = '../_base_/pspnet_r50-d8_4xb2-80k_ade20k-512x512.py'

norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
