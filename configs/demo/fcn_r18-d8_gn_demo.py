# Demo baseline: fcn_r18-d8_cbn_demo.py with GroupNorm instead of CBN
# (8 groups: the half-width network has layers of 16 and 32 channels).
# Everything else is identical, for accuracy comparisons on the synthetic
# demo data.
_base_ = './fcn_r18-d8_cbn_demo.py'

norm_cfg = dict(_delete_=True, type='GN', num_groups=8, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
custom_hooks = []
