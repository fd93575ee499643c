# Baseline for pspnet_r50-d8_cbn_4xb2-80k_ade20k-512x512.py: PSPNet R50-D8,
# ADE20K, 512x512 crops, 2 crops per GPU, 80k iterations, with SyncBN in the
# backbone (trained, norm_eval=False), the PSP head and the auxiliary FCN head.
# Everything else as in the CBN config.
#
# SyncBN is mmcv's 'SyncBN' type (torch.nn.SyncBatchNorm): statistics over the
# crops of all GPUs. It is the multi-GPU baseline: launch it distributed (a
# launcher such as torchrun with --launcher pytorch); without a process group
# torch falls back to per-GPU statistics, i.e. plain BN.
_base_ = '../_base_/pspnet_r50-d8_4xb2-80k_ade20k-512x512.py'

norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
