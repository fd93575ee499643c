# Copyright (c) mmcbn contributors. All rights reserved.
"""CBN inside stock mmdet and mmseg models, with no change to their code.

Faster R-CNN R50-FPN and PSPNet R50-D8 are built from the codebases' own
base configs with ``norm_cfg=dict(type='CBN', ...)`` in backbone, neck and
heads, and trained for a few SGD steps on small random inputs.
"""
import pytest
import torch

from mm_builders import (CBN_CFG, STEPS, build, det_batch, faster_rcnn_cfg,
                         pspnet_cfg, seg_batch, train_steps)
from mmcbn import CBN2d, binding_report, cbn_layers

CASES = {
    'faster_rcnn': ('mmdet', faster_rcnn_cfg, det_batch),
    'pspnet': ('mmseg', pspnet_cfg, seg_batch),
}


@pytest.fixture(scope='module', params=sorted(CASES))
def trained(request):
    scope, make_cfg, make_batch = CASES[request.param]
    model = build(scope, make_cfg(CBN_CFG))
    losses = train_steps(model, make_batch)
    return request.param, model, losses


def test_every_training_cbn_layer_binds_and_losses_are_finite(trained):
    name, model, losses = trained
    assert all(torch.isfinite(torch.tensor(losses))), losses
    report = binding_report(model)
    ran = {k: v for k, v in report.items() if v != ['not run']}
    assert len(ran) > 20
    unbound = {k: v for k, v in ran.items() if any(
        not e or e.startswith(('unbound', 'not run')) for e in v)}
    assert not unbound, unbound
    # each layer is bound to the conv right before it in its own block
    for layer_name, producers in ran.items():
        assert all(p and not p.startswith('frozen') for p in producers)
    for _, layer in cbn_layers(model):
        if layer.training:
            assert layer.iteration == STEPS - 1
            assert len(layer._windows[0]) == min(STEPS, layer.window - 1)


def test_producers_are_the_expected_convs(trained):
    name, model, _ = trained
    report = binding_report(model)
    if name == 'faster_rcnn':
        assert report['backbone.layer2.0.bn1'] == ['backbone.layer2.0.conv1']
        assert report['backbone.layer3.0.downsample.1'] == [
            'backbone.layer3.0.downsample.0']
        assert report['neck.lateral_convs.0.bn'] == [
            'neck.lateral_convs.0.conv']
        assert report['roi_head.bbox_head.shared_convs.3.bn'] == [
            'roi_head.bbox_head.shared_convs.3.conv']
    else:
        assert report['backbone.stem.1'] == ['backbone.stem.0']
        assert report['backbone.layer4.2.bn2'] == ['backbone.layer4.2.conv2']
        assert report['decode_head.bottleneck.bn'] == [
            'decode_head.bottleneck.conv']
        assert report['auxiliary_head.convs.0.bn'] == [
            'auxiliary_head.convs.0.conv']


def test_frozen_stages_and_norm_eval_keep_cbn_in_eval_mode():
    model = build('mmdet', faster_rcnn_cfg(CBN_CFG, norm_eval=False,
                                           frozen_stages=1))
    model.train()
    frozen = [model.backbone.norm1] + [
        m for m in model.backbone.layer1.modules() if isinstance(m, CBN2d)]
    assert frozen and all(not m.training for m in frozen)
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert model.backbone.layer2[0].bn1.training

    model = build('mmdet', faster_rcnn_cfg(CBN_CFG, norm_eval=True))
    model.train()
    backbone = [m for _, m in cbn_layers(model.backbone)]
    assert backbone and all(not m.training for m in backbone)
    assert model.neck.lateral_convs[0].bn.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()
              if 'running' in k}
    train_steps(model, det_batch, steps=1)
    after = model.backbone.state_dict()
    for k, v in before.items():  # eval-mode layers keep their statistics
        torch.testing.assert_close(after[k], v)
    assert binding_report(model)['backbone.layer2.0.bn1'] == ['not run']


@pytest.mark.parametrize('name', sorted(CASES))
def test_bn_state_dict_loads_both_ways(name):
    scope, make_cfg, make_batch = CASES[name]
    bn_model = build(scope, make_cfg(dict(type='BN')))
    train_steps(bn_model, make_batch, steps=1)
    cbn_model = build(scope, make_cfg(CBN_CFG))
    assert set(bn_model.state_dict()) == set(cbn_model.state_dict())
    cbn_model.load_state_dict(bn_model.state_dict())  # strict
    bn_back = build(scope, make_cfg(dict(type='BN')))
    bn_back.load_state_dict(cbn_model.state_dict())
    for key, value in bn_model.state_dict().items():
        torch.testing.assert_close(bn_back.state_dict()[key], value)
