# Copyright (c) mmcbn contributors. All rights reserved.
"""The speed benchmarks' --quick modes.

A quick run times tiny models once or twice, so its timings mean nothing:
for them these are smoke tests (every code path runs, the JSON has its
fields). Each test also checks facts that do not depend on timing and
could fail: memory accounting, the fused floor's agreement with the
separate computation, the exported model's outputs.
"""
import math

import pytest
import torch

from script_utils import run_quick


def test_train_speed_quick_smoke(tmp_path):
    """Smoke test of train_speed.py --quick; non-timing checks: window
    state per stored entry, its growth with the window, the fused floor."""
    result, stdout = run_quick('train_speed.py', tmp_path)
    fast = [f'CBN w{w} {v}' for w in (4, 8) for v in ('s2', 'bf16',
                                                       's2+bf16')]
    norms = [r['norm'] for r in result['resnet']]
    assert norms == ['BN', 'GN', 'CBN w1', 'CBN w2', 'CBN w4', 'CBN w8',
                     'CBN w16', 'CBN w8 const. entries', 'CBN w8 upstream',
                     'CBN w8 upstream fast', 'authors w8', 'MABN',
                     'GN+WS'] + fast
    rows = {r['norm']: r for r in result['resnet']}
    # the reparametrized peers ran with their own layers
    assert {'MABN2d', 'ConvWC'} <= set(rows['MABN']['layer_types'])
    assert 'Conv2d' not in rows['MABN']['layer_types']
    assert {'GroupNorm', 'ConvWS2d'} <= set(rows['GN+WS']['layer_types'])
    assert 'CBN2d' in rows['CBN w8']['layer_types']
    assert all(r['step_ms'] > 0 for r in rows.values())
    # exact, load-independent facts: state per stored iteration
    assert 1.0 <= rows['CBN w8']['window_state_per_weight'] <= 1.05
    assert rows['authors w8']['window_state_per_weight'] >= 2.99
    assert rows['CBN w1']['window_state_mb'] == 0
    # the upstream compensation's fast form keeps vectors, the exact one
    # two matrices per feeding norm
    up, fast = (rows[f'CBN w8 upstream{f}']['window_bytes']
                for f in ('', ' fast'))
    cbn = rows['CBN w8']['window_bytes']
    assert cbn < fast < 1.1 * cbn < 1.5 * cbn < up
    assert rows['CBN w8']['peak_mb'] > 0
    # bfloat16 storage halves the stored d nu / dW and nothing else;
    # sub-sampling stores the same
    for w in (4, 8):
        exact = rows[f'CBN w{w}']['window_bytes_by_buffer']
        assert rows[f'CBN w{w} s2']['window_bytes_by_buffer'] == exact
        for v in ('bf16', 's2+bf16'):
            half = dict(rows[f'CBN w{w} {v}']['window_bytes_by_buffer'])
            assert 2 * half.pop('var_grad') == exact['var_grad']
            assert half == {k: b for k, b in exact.items()
                            if k != 'var_grad'}
    assert [r['norm'] for r in result['detector']] == [
        'BN', 'GN', 'CBN', 'CBN s2+bf16']
    # every part and its floor, for every CBN variant with a window
    det = 'Faster R-CNN R50-FPN'
    parts = {(p['model'], p['norm']): p for p in result['parts']}
    assert set(parts) == {('ResNet-18', n) for n in norms
                          if n.startswith('CBN') and n != 'CBN w1'} | {
                              (det, 'CBN'), (det, 'CBN s2+bf16')}
    for (model, norm), p in parts.items():
        for part in ('normalization', 'recording', 'compensation',
                     'window gradient', 'upstream', 'everything else'):
            for key in ('cbn_ms', 'floor_ms', 'in_step_ms'):
                assert math.isfinite(p['parts'][part][key]), (norm, part)
        # in the instrumented step every part ran once per CBN call, and
        # the replays cover the same calls; the window gradient in every
        # call but with the authors' rule (constant entries)
        n, calls = p['norm_calls'], p['calls']
        assert n > 0 and p['record_calls'] == p['compensation_calls'] == n
        expected = ['norm.batch_stats', 'norm.forward', 'norm.backward',
                    'record.make', 'record.push', 'compensation']
        window_grad = norm != 'CBN w8 const. entries'
        if window_grad:
            expected += ['window_grad.terms', 'window_grad.params']
        upstream = {k: calls.pop(k) for k in list(calls)
                    if k.startswith('upstream.')}
        assert calls == {k: n for k in expected}, (norm, calls)
        if norm == 'CBN w8 upstream':
            # every call looks for its feeding norms; the layers behind
            # the max-pool (and the stem) have none, the others record
            # and apply the upstream derivatives
            assert upstream['upstream.bind'] == n
            assert 0 < upstream['upstream.upstream_grads'] < n
            assert upstream['upstream.upstream_terms'] == \
                upstream['upstream.upstream_shift'] > 0
            assert p['upstream_calls'] == upstream['upstream.upstream_grads']
            assert p['parts']['upstream']['cbn_ms'] > 0
        elif norm == 'CBN w8 upstream fast':
            # the fast form records and applies its vectors instead (timed
            # in the step, not replayed)
            assert upstream['upstream.bind'] == n
            assert 0 < upstream['upstream.fast_record'] < n
            assert upstream['upstream.fast_shift'] == \
                upstream['upstream.upstream_shift'] > 0
            assert 'upstream.upstream_grads' not in upstream
            assert p['upstream_calls'] == 0
            assert p['parts']['upstream']['in_step_ms'] > 0
        else:
            assert upstream == {} and p['upstream_calls'] == 0
        assert p['window_grad_calls'] == (n if window_grad else 0)
        if window_grad and model == 'ResNet-18':
            # the window gradient reads every stored derivative once
            by_buffer = rows[norm]['window_bytes_by_buffer']
            assert p['window_gradient_floor_bytes'] == \
                by_buffer['var_grad'] + by_buffer['pbar']
        assert p['weight_grad_products'] == n
        if model == 'ResNet-18':
            assert n == 20  # ResNet-18's convs
        # the compensation floor copies exactly the window state, and the
        # recording floor writes one stored d nu / dW per layer
        assert p['compensation_floor_bytes'] == p['window_bytes'] > 0
        if model == 'ResNet-18':
            window = int(norm.split()[1][1:])
            assert p['recording_floor_write_bytes'] * (window - 1) == \
                rows[norm]['window_bytes_by_buffer']['var_grad']
    assert 'parts / floors' in stdout
    fusion = result['summary']['fusion']
    # one weight-gradient call over [grad, 2x/m] gives both gradients
    assert fusion['fused_max_rel_diff'] < 1e-4
    assert fusion['convs'] == 20
    assert 'fused weight-gradient call' in stdout
    sub = result['summary']['subsampling']
    # slicing a 1x1 conv's input first gives the strided call's numbers
    assert sub['convs'] == 20 and sub['convs_1x1'] > 0
    assert sub['sliced_max_rel_diff'] < 1e-4
    assert result['device'] == 'cpu' and result['load_before']


def test_inference_speed_quick_smoke(tmp_path):
    """Smoke test of inference_speed.py --quick; the check that can fail:
    the exported (BN) model's raw outputs equal the CBN model's in eval
    mode, for norm layers with non-trivial statistics."""
    result, _ = run_quick('inference_speed.py', tmp_path, png=False)
    rows = result['rows']
    models = ('Faster R-CNN R50-FPN', 'PSPNet R50-D8')
    assert {(r['model'], r['norm']) for r in rows} == {
        (m, n) for m in models for n in ('CBN', 'BN', 'GN', 'exported')}
    assert all(r['forward_ms'] > 0 for r in rows)
    checks = result['exported_vs_cbn']
    assert set(checks) == set(models)
    for name, check in checks.items():
        assert check['values'] > 1000, (name, check)
        assert check['max_abs_diff'] <= 1e-5, (name, check)


def test_norm_speed_quick(tmp_path):
    result, stdout = run_quick('norm_speed.py', tmp_path, png=False)
    rows = result['rows']
    # every norm layer of ResNet-18 counted once, each distinct shape once
    assert result['overall']['layers'] == 20
    assert sum(r['layers'] for r in rows) == 20
    assert len({tuple(r['shape']) for r in rows}) == len(rows)
    for r in rows:
        for key in ('bn_ms', 'cbn_given_ms', 'cbn_layer_ms', 'ratio_given',
                    'ratio_layer'):
            assert math.isfinite(r[key]), (r['shape'], key)
        assert set(r['passes_ms']) == {
            'bn_forward', 'bn_backward', 'cbn_batch_stats', 'cbn_normalize',
            'cbn_backward_kernel', 'cbn_backward_elementwise'}
    # the timed CBN path is the real one: with no history its gradients
    # are BatchNorm's
    assert result['check_max_rel'] < 1e-4
    assert result['budget']['budget'] == 1.15
    assert 'budget <= 1.15x' in stdout


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason='needs a CUDA GPU (--device cuda)')
@pytest.mark.parametrize('script', ['train_speed.py', 'inference_speed.py',
                                    'norm_speed.py'])
def test_speed_benchmarks_on_cuda(tmp_path, script):
    result, _ = run_quick(script, tmp_path, '--device', 'cuda', png=False)
    assert result['device'].startswith('cuda')


@pytest.mark.parametrize('depth', [18, 50])
def test_plain_resnet_has_mmdets_layers(depth, monkeypatch):
    """Where mmdet cannot be imported (a GPU machine with no mmcv build),
    train_speed.py times benchmarks/plain_resnet.py instead: it must be
    mmdet's ResNet layer for layer (parameter shapes in order, conv
    strides, the output), with the norm the config names."""
    import os.path as osp
    import sys

    from mmdet.models.backbones import ResNet

    from mmcbn import CBN2d
    sys.path.insert(0, osp.join(osp.dirname(osp.dirname(__file__)),
                                'benchmarks'))
    import train_speed
    from plain_resnet import PlainResNet
    monkeypatch.setattr(train_speed, 'backbone_source', lambda: 'plain')
    cfg = dict(type='CBN', window=4)
    plain = train_speed.Classifier(depth, cfg).backbone
    assert isinstance(plain, PlainResNet)
    ref = ResNet(depth, norm_cfg=cfg, out_indices=(3, ))

    def layout(model):
        convs = [(m.stride, m.padding) for m in model.modules()
                 if isinstance(m, torch.nn.Conv2d)]
        return [tuple(p.shape) for p in model.parameters()], convs, sum(
            isinstance(m, CBN2d) for m in model.modules())

    assert layout(plain) == layout(ref)
    x = torch.randn(2, 3, 32, 32)
    assert plain(x)[0].shape == ref(x)[0].shape
    gn = PlainResNet(depth, dict(type='GN', num_groups=32))
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in gn.modules()) == \
        layout(ref)[2]
    with pytest.raises(ValueError, match='got 34'):
        PlainResNet(34, cfg)
