# PSPNet R50-D8, Cityscapes, 512x1024 crops, 2 crops per GPU, 80k iterations,
# with Cross-Iteration BN in the backbone (trained, norm_eval=False), the PSP
# head and the auxiliary FCN head.
#
# Burn-in is given in iterations: mmseg trains with an IterBasedTrainLoop (80k
# iterations over an infinite sampler, no epochs), so burnin=20000 iterations
# is a quarter of the schedule, the same fraction as the paper's 3 of 12 epochs
# for detection. window=4 as in the paper's detection setup, which has the same
# per-GPU batch of 2.
#
# Baselines differing only in the norm:
# pspnet_r50-d8_bn_4xb2-80k_cityscapes-512x1024.py,
# pspnet_r50-d8_gn_4xb2-80k_cityscapes-512x1024.py,
# pspnet_r50-d8_syncbn_4xb2-80k_cityscapes-512x1024.py.
_base_ = [
    '../_base_/pspnet_r50-d8_4xb2-80k_cityscapes-512x1024.py',
    '../_base_/cbn_runtime.py'
]

norm_cfg = dict(type='CBN', window=4, burnin=20000, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
