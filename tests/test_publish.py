# Copyright (c) mmcbn contributors. All rights reserved.
"""tools/publish_model.py: CBN runs exported for stock mmdet/mmseg."""
import hashlib
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MessageHub

from mm_builders import (CBN_CFG, FASTER_RCNN, PSPNET, build, det_batch,
                         faster_rcnn_cfg, full_config, pspnet_cfg, seg_batch,
                         train_steps)
from mmcbn.export import export_config

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TESTS = osp.join(ROOT, 'tests')
sys.path.insert(0, osp.join(ROOT, 'tools'))
import publish_model  # noqa: E402

#: MABN with short warm-ups, so that 3 steps use every part of it.
MABN_CFG = dict(type='MABN', buffer_size=2, sma_warmup=1, renorm_warmup=2)


def mabn_faster_rcnn_cfg(_):
    """Faster R-CNN with MABN behind weight-centred convolutions in the
    backbone, the FPN and the box head (MABN's recipe)."""
    model = faster_rcnn_cfg(MABN_CFG)
    for part in (model.backbone, model.neck, model.roi_head.bbox_head):
        part.conv_cfg = dict(type='ConvWC')
    return model


KINDS = {
    'det': ('mmdet', FASTER_RCNN, faster_rcnn_cfg, det_batch),
    'seg': ('mmseg', PSPNET, pspnet_cfg, seg_batch),
    'det_mabn': ('mmdet', FASTER_RCNN, mabn_faster_rcnn_cfg, det_batch),
}


def runner_like_checkpoint(model, cfg, path):
    """What an mmengine runner saves, numpy and HistoryBuffer included."""
    hub = MessageHub.get_instance('publish-test')
    hub.update_scalar('train/loss', 1.5)
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save(
        dict(
            meta=dict(
                epoch=1,
                iter=3,
                seed=np.int64(7),
                cfg=cfg.pretty_text,
                dataset_meta=dict(classes=('a', 'b'),
                                  palette=np.array([[1, 2, 3], [4, 5, 6]]))),
            state_dict=model.state_dict(),
            optimizer=optim.state_dict(),
            message_hub=hub.state_dict(),
            param_schedulers=[dict(last_epoch=1)]), path)


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope='module', params=sorted(KINDS))
def published(request, tmp_path_factory):
    kind = request.param
    scope, base, make_cfg, make_batch = KINDS[kind]
    tmp = tmp_path_factory.mktemp(f'publish_{kind}')
    cfg = full_config(base, make_cfg(CBN_CFG))
    config = str(tmp / f'{kind}_r50_cbn.py')
    cfg.dump(config)
    model = build(scope, cfg.model)
    train_steps(model, make_batch)
    in_ckpt = str(tmp / 'iter_3.pth')
    runner_like_checkpoint(model, cfg, in_ckpt)
    in_sha = sha256(in_ckpt)
    model.eval()
    with torch.no_grad():
        result = model.test_step(make_batch(7))
    if kind.startswith('det'):
        expected = [(r.pred_instances.bboxes, r.pred_instances.scores)
                    for r in result]
    else:
        expected = [r.seg_logits.data for r in result]
    out_dir = str(tmp / 'zoo')
    assert publish_model.main([in_ckpt, out_dir, '--config', config]) == 0
    assert sha256(in_ckpt) == in_sha  # the input is untouched
    return dict(kind=kind, config=config, in_ckpt=in_ckpt, out_dir=out_dir,
                expected=expected, tmp=tmp)


def outputs_of(published):
    files = sorted(os.listdir(published['out_dir']))
    cfg = [f for f in files if f.endswith('.py')]
    ckpt = [f for f in files if f.endswith('.pth')]
    assert len(cfg) == 1 and len(ckpt) == 1, files
    return (osp.join(published['out_dir'], cfg[0]),
            osp.join(published['out_dir'], ckpt[0]))


def test_published_files_are_plain_bn(published):
    cfg_path, ckpt_path = outputs_of(published)
    name = osp.splitext(osp.basename(published['config']))[0]
    assert osp.basename(cfg_path) == name + '.py'
    assert osp.basename(ckpt_path) == f'{name}-{sha256(ckpt_path)[:8]}.pth'
    text = open(cfg_path).read()
    assert 'CBN' not in text and 'mmcbn' not in text
    assert 'MABN' not in text and 'ConvWC' not in text
    cfg = Config.fromfile(cfg_path)
    assert cfg.model.backbone.norm_cfg.type == 'BN'
    if published['kind'] == 'det_mabn':
        assert cfg.model.backbone.conv_cfg == dict(type='Conv2d')
        assert cfg.model.roi_head.bbox_head.norm_cfg == dict(type='BN')
    assert cfg.model.backbone.get('init_cfg') is None
    # stock torch, default weights-only loading, with no allow-list at all
    torch.serialization.clear_safe_globals()
    try:
        ckpt = torch.load(ckpt_path)
    finally:
        from mmcbn import register_safe_globals
        register_safe_globals()
    assert set(ckpt) == {'meta', 'state_dict'}
    assert ckpt['meta']['seed'] == 7 and isinstance(ckpt['meta']['seed'],
                                                    int)
    assert 'CBN' not in ckpt['meta']['cfg']


def test_stock_process_without_mmcbn_gives_the_same_outputs(published):
    cfg_path, ckpt_path = outputs_of(published)
    out = str(published['tmp'] / 'stock_outputs.pt')
    env = dict(os.environ, PYTHONPATH=TESTS)
    proc = subprocess.run(
        [sys.executable, osp.join(TESTS, 'stock_inference.py'), cfg_path,
         ckpt_path, published['kind'][:3], out],
        cwd=str(published['tmp']), env=env, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    torch.testing.assert_close(got, published['expected'], rtol=1e-5,
                               atol=1e-5)


def test_never_overwrites_without_force(published, capsys):
    cfg_path, ckpt_path = outputs_of(published)
    before = sha256(ckpt_path)
    args = [published['in_ckpt'], published['out_dir'], '--config',
            published['config']]
    assert publish_model.main(args) == 1
    err = capsys.readouterr().err
    assert 'exists; use --force' in err and err.count('\n') == 1
    assert publish_model.main(args + ['--force']) == 0
    assert sha256(ckpt_path) == before  # deterministic content
    assert sorted(os.listdir(published['out_dir'])) == sorted(
        [osp.basename(cfg_path), osp.basename(ckpt_path)])


@pytest.mark.parametrize('damage', ['truncated', 'text', 'no_state_dict'])
def test_bad_input_is_a_one_line_error_and_writes_nothing(
        published, damage, tmp_path, capsys):
    bad = str(tmp_path / 'bad.pth')
    if damage == 'truncated':
        with open(published['in_ckpt'], 'rb') as f:
            data = f.read()
        with open(bad, 'wb') as f:
            f.write(data[:len(data) // 2])
    elif damage == 'text':
        with open(bad, 'w') as f:
            f.write('definitely not a checkpoint')
    else:
        torch.save(dict(meta={}), bad)
    out_dir = str(tmp_path / 'out')
    code = publish_model.main([bad, out_dir, '--config',
                               published['config']])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith('error: ') and err.count('\n') == 1, err
    assert not osp.exists(out_dir) or os.listdir(out_dir) == []


def test_export_config_converts_every_norm():
    cfg = Config(
        dict(
            custom_imports=dict(imports=['mmcbn', 'my_pkg']),
            custom_hooks=[dict(type='CBNHook'), dict(type='EMAHook')],
            optim_wrapper=dict(type='CPUAutocastOptimWrapper',
                               dtype='bfloat16', optimizer=dict(type='SGD')),
            model=dict(
                backbone=dict(
                    norm_cfg=dict(type='CBN', window=4, burnin=2,
                                  burnin_by_epoch=True, compensate=True),
                    init_cfg=dict(type='Pretrained', checkpoint='x')),
                neck=dict(norm_cfg=dict(type='SyncBN', requires_grad=True)),
                heads=[dict(norm_cfg=dict(type='CBN1d')),
                       dict(norm_cfg=dict(type='MMSyncBN')),
                       dict(norm_cfg=dict(type='GN', num_groups=32)),
                       dict(norm_cfg=dict(type='MABN', buffer_size=8,
                                          momentum=0.02),
                            conv_cfg=dict(type='ConvWC'))]),
            load_from='a.pth',
            resume=True))
    out = export_config(cfg)
    assert out.custom_imports.imports == ['my_pkg']
    assert out.custom_hooks == [dict(type='EMAHook')]
    assert out.optim_wrapper.type == 'OptimWrapper'
    assert 'dtype' not in out.optim_wrapper
    assert out.model.backbone.norm_cfg == dict(type='BN')
    assert out.model.backbone.init_cfg is None
    assert out.model.neck.norm_cfg == dict(type='BN', requires_grad=True)
    assert [h['norm_cfg'] for h in out.model.heads] == [
        dict(type='BN1d'), dict(type='BN'), dict(type='GN', num_groups=32),
        dict(type='BN', momentum=0.02)]
    assert out.model.heads[3]['conv_cfg'] == dict(type='Conv2d')
    assert out.load_from is None and out.resume is False
