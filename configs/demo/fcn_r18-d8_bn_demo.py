# Demo baseline: fcn_r18-d8_cbn_demo.py with BatchNorm instead of CBN
# (statistics of the current 2 crops only). Everything else is identical,
# for accuracy comparisons on the synthetic demo data.
_base_ = './fcn_r18-d8_cbn_demo.py'

norm_cfg = dict(_delete_=True, type='BN', requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
custom_hooks = []
