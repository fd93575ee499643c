# PSPNet R50-D8, Cityscapes, 512x1024 crops, 2 crops per GPU, 80k iterations,
# with SyncCBN in the backbone, the PSP head and the auxiliary head:
# statistics pooled over the GPUs *and* the last 4 iterations. Launch it
# distributed (tools/dist_train.sh CONFIG NGPUS); in a single process it is
# CBN.
#
# Differs from pspnet_r50-d8_cbn_4xb2-80k_cityscapes-512x1024.py in the norm
# type only (window 4, burn-in 20000 iterations).
_base_ = './pspnet_r50-d8_cbn_4xb2-80k_cityscapes-512x1024.py'

norm_cfg = dict(type='SyncCBN', window=4, burnin=20000, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
