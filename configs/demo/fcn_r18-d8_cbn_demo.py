# Demo: FCN semantic segmentation with Cross-Iteration BN, from scratch on CPU.
#
# Data: the synthetic mmseg folder dataset of tools/make_demo_data.py
# (img_dir/ + ann_dir/, 128x128, background + circle/triangle/rectangle,
# label 255 on object borders is ignored). Model: a half-width ResNetV1c-18
# with dilations (output stride 8), an FCN decode head and an FCN auxiliary
# head, every norm layer CBN (window 4). 2 crops per iteration, no
# pretrained weights; the whole training takes minutes on a 2-core CPU.
#
# The schedule is iteration-based (IterBasedTrainLoop with an infinite
# sampler, as usual in mmseg), so the burn-in is given in iterations too:
# an "epoch" is no unit of this schedule. It covers the first quarter of
# training, while the weights change fastest and old statistics would be
# compensated worst; CBN then averages the statistics of the last 4
# iterations (8 crops instead of 2).
#
#   python tools/make_demo_data.py
#   python tools/train.py configs/demo/fcn_r18-d8_cbn_demo.py
#
# The BN and GN variants (fcn_r18-d8_{bn,gn}_demo.py) differ only in the norm
# layers.
_base_ = [
    'mmseg::_base_/models/fcn_r50-d8.py', 'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_20k.py'
]

custom_imports = dict(imports=['mmcbn'], allow_failed_imports=False)

max_iters = 800
norm_cfg = dict(type='CBN', window=4, burnin=200)
classes = ('background', 'circle', 'triangle', 'rectangle')
palette = [[0, 0, 0], [220, 20, 60], [0, 160, 0], [30, 80, 255]]
crop_size = (128, 128)

model = dict(
    pretrained=None,
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        depth=18,
        stem_channels=32,
        base_channels=32,  # half width: 32-64-128-256 channels
        norm_cfg=norm_cfg,
        init_cfg=None),
    decode_head=dict(
        in_channels=256,
        channels=64,
        num_classes=len(classes),
        norm_cfg=norm_cfg),
    auxiliary_head=dict(
        in_channels=128,
        channels=32,
        num_classes=len(classes),
        norm_cfg=norm_cfg))

# ------------------------------------------------------------------ data
dataset_type = 'BaseSegDataset'
data_root = 'data/demo/seg/'
metainfo = dict(classes=classes, palette=palette)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(
        type='RandomResize',
        scale=crop_size,
        ratio_range=(0.75, 1.5),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.9),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
dataset = dict(
    type=dataset_type,
    data_root=data_root,
    metainfo=metainfo,
    img_suffix='.jpg',
    seg_map_suffix='.png',
    reduce_zero_label=False,
    ignore_index=255)
train_dataloader = dict(
    batch_size=2,
    num_workers=1,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        **dataset,
        data_prefix=dict(
            img_path='img_dir/train', seg_map_path='ann_dir/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2,
    num_workers=1,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        **dataset,
        data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

# -------------------------------------------------------------- schedule
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=5e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(
        type='PolyLR',
        eta_min=1e-4,
        power=0.9,
        begin=50,
        end=max_iters,
        by_epoch=False)
]
train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)

# --------------------------------------------------------------- runtime
custom_hooks = [dict(type='CBNHook')]
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(
        by_epoch=False, interval=max_iters, max_keep_ckpts=1, save_last=True))
log_processor = dict(window_size=10)
randomness = dict(seed=0)
