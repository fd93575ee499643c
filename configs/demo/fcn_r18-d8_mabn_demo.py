# Demo baseline: fcn_r18-d8_cbn_demo.py with MABN (Yan et al., ICLR 2020)
# behind weight-centred convolutions (ConvWC) instead of CBN, the paper's
# recipe, in the backbone and both heads. Everything else is identical, for
# accuracy comparisons on the synthetic demo data.
#
# MABN's settings for the demo's 800 iterations at 2 crops: moving averages
# over 16 iterations (= 32 / 2), the batch's own statistics for the first
# 100 iterations, the renormalization factor r after 320 (40% of the
# schedule, as 1000 of MABN's ~2500-iteration photo runs).
_base_ = './fcn_r18-d8_cbn_demo.py'

norm_cfg = dict(
    _delete_=True,
    type='MABN',
    buffer_size=16,
    sma_warmup=100,
    renorm_warmup=320,
    requires_grad=True)
conv_cfg = dict(type='ConvWC')
model = dict(
    backbone=dict(norm_cfg=norm_cfg, conv_cfg=conv_cfg),
    decode_head=dict(norm_cfg=norm_cfg, conv_cfg=conv_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg, conv_cfg=conv_cfg))
custom_hooks = []
