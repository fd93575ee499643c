# Demo: FCN segmentation with SyncCBN, for 2 processes on a CPU (gloo).
#
# The CBN demo (fcn_r18-d8_cbn_demo.py) with SyncCBN: each of the processes
# that tools/dist_train.sh starts gets 2 crops per iteration, and every norm
# layer normalizes with the statistics of all processes' crops of the last 4
# iterations (window 4 x 2 processes x 2 crops = 16 crops). Without CUDA
# the processes use gloo and a CPU DDP wrapper:
#
#   python tools/make_demo_data.py
#   bash tools/dist_train.sh configs/demo/fcn_r18-d8_synccbn_demo.py 2
#
# In a single process (tools/train.py) it is the CBN demo.
_base_ = './fcn_r18-d8_cbn_demo.py'

norm_cfg = dict(type='SyncCBN', window=4, burnin=200)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
