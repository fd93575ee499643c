# Copyright (c) mmcbn contributors. All rights reserved.
"""Behaviour of the CBN layer itself: BN equivalence, interop, errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.registry import DefaultScope
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmcbn import (CBN, CBN1d, CBN2d, CBN3d, binding_report,
                   check_autograd_introspection, read_cbn_flags,
                   set_cbn_iteration)
from mmcbn.binding import find_producer


def conv_cbn(window=4, burnin=0, seed=0, **kw):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), CBN2d(8, window=window,
                                             burnin=burnin, **kw))


def conv_bn(model):
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
    bn.load_state_dict(model.state_dict())
    return bn


def sgd_steps(model, steps, seed=1, lr=0.1):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    outs, grads = [], []
    for _ in range(steps):
        x = torch.randn(2, 3, 6, 6, generator=gen) * 2 + 1
        y = model(x)
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + (
            y**4).mean()
        opt.zero_grad()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        outs.append(y.detach())
    return outs, grads


@pytest.mark.parametrize('window,burnin', [(1, 0), (4, 6)])
def test_window_one_and_burnin_are_batchnorm(window, burnin):
    """window=1 always, and any window during burn-in, is nn.BatchNorm2d."""
    cbn = conv_cbn(window, burnin)
    bn = conv_bn(cbn)
    steps = 6  # all inside burn-in for the second case
    out_c, grad_c = sgd_steps(cbn, steps)
    out_b, grad_b = sgd_steps(bn, steps)
    for a, b in zip(out_c, out_b):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for ga, gb in zip(grad_c, grad_b):
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name in ('running_mean', 'running_var', 'num_batches_tracked'):
        torch.testing.assert_close(
            getattr(cbn[1], name), getattr(bn[1], name), rtol=1e-5,
            atol=1e-6)


def test_window_starts_right_after_burnin():
    cbn = conv_cbn(window=4, burnin=3)
    sgd_steps(cbn, 3)
    layer = cbn[1]
    assert layer.window_at(2) == 1 and layer.window_at(3) == 4
    # statistics were recorded during burn-in: the window is full at once
    state = layer._windows[0]
    assert sorted(state.iterations) == [0, 1, 2]
    history = state.compensated(3, 3, layer.bindings[0].key,
                                cbn[0].weight.detach(), cbn[0].bias.detach())
    # one row per lag 1..3 (iterations 2, 1, 0), each with its 2*6*6 samples
    assert history.mean.shape == (3, 8)
    assert history.count.tolist() == [72.0, 72.0, 72.0]


def test_eval_mode_is_batchnorm_with_same_buffers():
    cbn = conv_cbn(window=4)
    sgd_steps(cbn, 5)
    bn = conv_bn(cbn)
    cbn.eval(), bn.eval()
    x = torch.randn(3, 3, 7, 7)
    torch.testing.assert_close(cbn(x), bn(x), rtol=0, atol=0)


def test_state_dict_interoperates_with_batchnorm():
    cbn = conv_cbn(window=4)
    sgd_steps(cbn, 3)
    bn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
    assert set(cbn.state_dict()) == set(bn.state_dict())
    bn.load_state_dict(cbn.state_dict())  # strict: no missing/extra keys
    back = conv_cbn(window=8, seed=5)
    back.load_state_dict(bn.state_dict())
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)


def test_counts_as_batchnorm_everywhere():
    layer = CBN(4)
    assert isinstance(layer, _BatchNorm) and isinstance(layer, nn.BatchNorm2d)
    assert isinstance(CBN1d(4), nn.BatchNorm1d)
    assert isinstance(CBN3d(4), nn.BatchNorm3d)
    name, built = build_norm_layer(dict(type='CBN', window=2), 4)
    assert name == 'bn' and isinstance(built, CBN2d)
    assert built.window == 2
    # mmengine's optimizer constructor and init configs see a BN
    from mmengine.model.weight_init import _get_bases_name
    assert '_BatchNorm' in _get_bases_name(layer)


@pytest.mark.parametrize('scope', [None, 'mmdet', 'mmseg'])
def test_registered_in_root_registry_for_every_scope(scope):
    if scope is None:
        _, layer = build_norm_layer(dict(type='CBN'), 6)
    else:
        import importlib
        importlib.import_module(f'{scope}.registry')
        with DefaultScope.overwrite_default_scope(scope):
            from mmengine.registry import MODELS as ROOT
            child = importlib.import_module(f'{scope}.registry').MODELS
            assert child.parent is ROOT
            layer = child.build(dict(type='CBN', num_features=6, window=3))
    assert isinstance(layer, CBN2d) and layer.num_features == 6


@pytest.mark.parametrize('kwargs,match', [
    (dict(window=0), 'window must be an integer >= 1, got 0'),
    (dict(window=2.5), 'window must be an integer >= 1, got 2.5'),
    (dict(window=True), 'window must be an integer >= 1, got True'),
    (dict(burnin=-1), 'burnin must be an integer >= 0, got -1'),
    (dict(burnin=-0.5, burnin_by_epoch=True), r'burnin \(epochs\)'),
    (dict(compensate='yes'),
         "compensate must be True, False or 'upstream', got 'yes'"),
    (dict(running_stats_from='windows'),
     "running_stats_from must be None or one of 'batch', 'window', got "
         "'windows'"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CBN2d(4, **kwargs)


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(TypeError, match='windw'):
        build_norm_layer(dict(type='CBN', windw=4), 4)


@pytest.mark.parametrize('layer,shape,match', [
    (CBN2d(4), (2, 4, 5), r'expects a 4D input .* got a 3D input of shape '
     r'\(2, 4, 5\)'),
    (CBN1d(4), (2, 4, 3, 3), 'expects a 2D or 3D input'),
    (CBN3d(4), (2, 4, 3, 3), 'expects a 5D input'),
    (CBN2d(4), (2, 5, 3, 3), 'num_features=4 but its input has 5 channels'),
    (CBN2d(4), (1, 4, 1, 1), 'more than 1 value per channel'),
])
def test_wrong_input_is_a_clear_error(layer, shape, match):
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(shape))


def test_burnin_in_epochs_needs_the_epoch_length():
    model = nn.Sequential(nn.Conv2d(3, 4, 1),
                          CBN2d(4, burnin=2, burnin_by_epoch=True))
    with pytest.raises(RuntimeError, match='CBNHook'):
        model(torch.randn(2, 3, 4, 4))
    from mmcbn import set_cbn_epoch_length
    set_cbn_epoch_length(model, 5)
    assert model[1].burnin_iters == 10
    model(torch.randn(2, 3, 4, 4))


def test_unbound_layer_falls_back_to_bn_and_warns_once(mmlogs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), CBN2d(8, window=4))
    model[2].cbn_name = 'neck.relu_bn'
    bn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8))
    bn.load_state_dict(model.state_dict())
    for _ in range(3):
        x = torch.randn(2, 3, 6, 6)
        torch.testing.assert_close(model(x), bn(x))
    warnings = [m for m in mmlogs.messages if 'neck.relu_bn' in m]
    assert len(warnings) == 1
    assert 'ReluBackward0' in warnings[0]
    assert model[2].bindings[0].status == 'unbound'
    assert binding_report(model)['2'][0].startswith('unbound:')


def test_binding_report_names_the_producer():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), CBN2d(8, window=2))
    model(torch.randn(2, 3, 5, 5))
    assert binding_report(model) == {'1': ['0']}


@pytest.mark.parametrize('conv, shape, text', [
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 5, 5),
     'Conv2d(4->6, k=3x3, s=(2, 2), d=(1, 1), g=2, bias=True)'),
    (nn.Conv3d(2, 3, (1, 3, 3), bias=False), (1, 2, 3, 5, 5),
     'Conv3d(2->3, k=1x3x3, s=(1, 1, 1), d=(1, 1, 1), g=1, bias=False)'),
    (nn.Conv1d(2, 3, 5, dilation=2, bias=False), (2, 2, 12),
     'Conv1d(2->3, k=5, s=(1,), d=(2,), g=1, bias=False)'),
])
def test_binding_describes_the_convolution(conv, shape, text):
    """Reports name the producer by its arguments; a bias-free 3d
    convolution (which saves an empty bias on the CPU) has no bias."""
    x = conv(torch.randn(shape))
    assert find_producer(x).producer.description == text
    # formatted once per layout, the same for a second layer like it
    twin = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size,
                      conv.stride, conv.padding, conv.dilation, conv.groups,
                      conv.bias is not None)
    assert find_producer(twin(torch.randn(shape))).producer.description \
        == text


def test_binding_info_follows_the_producer():
    """What a call was bound to is the last call's: the same producer keeps
    its info (not rebuilt every step), another one or none replaces it."""
    a, b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3, bias=False)
    norm = CBN2d(4, window=2)
    x = torch.randn(2, 3, 6, 6)
    norm(a(x))
    first = norm.bindings[0]
    assert first.status == 'bound' and first.weight_id == id(a.weight)
    norm(a(x))
    assert norm.bindings[0] is first
    norm(b(x))
    info = norm.bindings[0]
    assert info.weight_id == id(b.weight) and 'bias=False' in \
        info.description
    norm(torch.relu(b(x)))
    assert norm.bindings[0].status == 'unbound'
    assert 'ReluBackward0' in norm.bindings[0].reason
    b.weight.requires_grad_(False)  # the same layer, now frozen
    norm(b(x.requires_grad_()))
    assert norm.bindings[0].status == 'frozen'
    assert norm.bindings[0].description == info.description


def test_shared_layer_keeps_one_window_per_call_position():
    """A head shared over levels == one CBN per level (tied γ/β)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    shared = CBN2d(4, window=3)
    per_level = [CBN2d(4, window=3) for _ in range(3)]
    conv2 = copy.deepcopy(conv)
    for layer in per_level[1:]:
        layer.weight, layer.bias = per_level[0].weight, per_level[0].bias
    params_a = list(conv.parameters()) + list(shared.parameters())
    params_b = list(conv2.parameters()) + list(per_level[0].parameters())
    opt_a = torch.optim.SGD(params_a, lr=0.1)
    opt_b = torch.optim.SGD(params_b, lr=0.1)
    gen = torch.Generator().manual_seed(3)
    for it in range(6):
        shared.start_iteration(it)
        levels = [torch.randn(2, 3, s, s, generator=gen) * (lvl + 1) + lvl
                  for lvl, s in enumerate((8, 4, 2))]
        out_a = [shared(conv(x)) for x in levels]
        out_b = [n(conv2(x)) for n, x in zip(per_level, levels)]
        for a, b in zip(out_a, out_b):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for opt, outs in ((opt_a, out_a), (opt_b, out_b)):
            opt.zero_grad()
            sum((o**2).mean() + o.mean() for o in outs).backward()
            opt.step()
    assert len(shared._windows) == 3
    assert [len(w) for w in shared._windows] == [2, 2, 2]


def test_set_cbn_iteration_drives_burnin_and_survives_gaps():
    """burnin=10, window=3, iterations given with set_cbn_iteration. The
    method note's rules: window 1 at iterations 0..9 (statistics still
    recorded), from iteration 10 on the current batch and the entries of
    t-2 and t-1 that exist. The conv is not trained, so compensation is
    zero and the expected output is computed here, in float64, from the
    batches' own statistics."""
    model = conv_cbn(window=3, burnin=10)
    conv, layer = model
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    gen = torch.Generator().manual_seed(0)
    # every iteration's batch has its own mean and spread
    batches = {
        it: torch.randn(2, 3, 6, 6, generator=gen) * (1 + 0.3 * (it % 4)) +
        0.5 * (it % 3)
        for it in (7, 8, 9, 10, 11, 13, 20)
    }

    def expected(its):
        """Normalization of batch ``its[-1]`` with the statistics pooled
        over the batches ``its`` (equal weights, as in the note)."""
        with torch.no_grad():
            xs = [conv(batches[i]).double() for i in its]
        mean = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
        nu = torch.stack([x.square().mean((0, 2, 3)) for x in xs]).mean(0)
        var = (nu - mean.square()).clamp_min(0)
        y = (xs[-1] - mean[:, None, None]) / (
            var[:, None, None] + layer.eps).sqrt()
        return (y * layer.weight.double()[:, None, None] +
                layer.bias.double()[:, None, None]).float()

    def run(it):
        set_cbn_iteration(model, it)
        y = model(batches[it])
        assert layer.iteration == it
        return y.detach()

    close = dict(rtol=1e-5, atol=1e-5)
    for it in (7, 8):
        torch.testing.assert_close(run(it), expected([it]), **close)
    # iteration 9 < burnin: BatchNorm although entries of 7 and 8 exist
    y9 = run(9)
    torch.testing.assert_close(y9, expected([9]), **close)
    assert not torch.allclose(y9, expected([7, 8, 9]), **close)
    # iteration 10 == burnin: the full window, entries of 8 and 9
    y10 = run(10)
    torch.testing.assert_close(y10, expected([8, 9, 10]), **close)
    assert not torch.allclose(y10, expected([9, 10]), **close)
    assert not torch.allclose(y10, expected([10]), **close)
    torch.testing.assert_close(run(11), expected([9, 10, 11]), **close)
    # a gap (e.g. after a resume): at 13 the window is 11 and 12; only the
    # entry of 11 exists, so two batches are pooled
    torch.testing.assert_close(run(13), expected([11, 13]), **close)
    # at 20 the entries of 11 and 13 are too old: BatchNorm
    torch.testing.assert_close(run(20), expected([20]), **close)


def test_nonfinite_history_is_dropped_and_running_stats_stay_finite(mmlogs):
    model = conv_cbn(window=3)
    model(torch.randn(2, 3, 6, 6))
    state = model[1]._windows[0]
    state._buffers['a_var'][0, 2] = float('nan')  # a corrupt entry
    reference = conv_bn(model)
    x = torch.randn(2, 3, 6, 6)
    y = model(x)
    # the only history entry was dropped: this iteration is plain BN
    torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-5)
    read_cbn_flags(model)  # warnings come when the device flags are read
    assert any('not finite' in m for m in mmlogs.messages)
    before = model[1].running_mean.clone()
    bad = torch.randn(2, 3, 6, 6)
    bad[0, 0, 0, 0] = float('inf')
    model(bad)
    read_cbn_flags(model)
    assert any('running statistics were not updated' in m
               for m in mmlogs.messages)
    assert torch.isfinite(model[1].running_mean).all()
    assert torch.isfinite(model[1].running_var).all()
    torch.testing.assert_close(model[1].running_mean, before)


def test_window_state_is_one_weight_per_entry():
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    layer = CBN2d(64, window=8)
    for _ in range(10):
        layer(conv(torch.randn(2, 64, 8, 8)))
    weight_bytes = conv.weight.numel() * conv.weight.element_size()
    per_entry = layer.window_state_nbytes() / 7
    assert per_entry <= 1.05 * weight_bytes, (per_entry, weight_bytes)


def test_bfloat16_autocast_keeps_float32_statistics():
    model = conv_cbn(window=4)
    for _ in range(3):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = model(torch.randn(2, 3, 6, 6))
        assert y.dtype == torch.bfloat16
        y.float().pow(2).mean().backward()
    state = model[1]._windows[0]
    assert all(b.dtype == torch.float32 for b in state._buffers.values())
    binding = model[1].bindings[0]
    # through autocast's cast, the fp32 parameter itself is found
    assert binding.status == 'bound'
    assert binding.weight_id == id(model[0].weight)
    assert model[1].running_var.dtype == torch.float32
    assert torch.isfinite(model[1].running_var).all()


def test_linear_and_conv1d_conv3d_producers_bind():
    cases = [
        (nn.Linear(5, 4), CBN1d(4, window=2), (3, 5)),
        (nn.Conv1d(3, 4, 3), CBN1d(4, window=2), (2, 3, 7)),
        (nn.Conv3d(3, 4, 2), CBN3d(4, window=2), (2, 3, 4, 4, 4)),
    ]
    for producer, norm, shape in cases:
        for _ in range(2):
            norm(producer(torch.randn(shape))).sum().backward()
        assert norm.bindings[0].status == 'bound', norm.bindings[0]
        assert len(norm._windows[0]) == 1


def test_effective_weight_is_compensated_like_a_parameter():
    """A computed weight (e.g. weight standardization) still binds."""
    base = nn.Parameter(torch.randn(4, 3, 3, 3))
    x = torch.randn(2, 3, 6, 6)
    out = F.conv2d(x, base / base.norm())
    binding = find_producer(out)
    assert binding.status == 'bound'
    torch.testing.assert_close(binding.producer.weight,
                               (base / base.norm()).detach())


def test_introspection_self_check_passes_on_this_torch():
    check_autograd_introspection()


def test_no_grad_training_forward_is_unbound():
    model = conv_cbn(window=4)
    with torch.no_grad():
        model(torch.randn(2, 3, 6, 6))
    assert model[1].bindings[0].status == 'unbound'
    assert 'grad mode is off' in model[1].bindings[0].reason


@pytest.mark.parametrize('reentrant', [True, False])
def test_activation_checkpointing_is_consistent_batchnorm(reentrant, mmlogs):
    """with_cp=True: the layer cannot bind, so it is BN in the forward and
    in the recomputation during backward alike (gradients consistent),
    counting each iteration and updating running statistics once."""
    import torch.utils.checkpoint as cp
    cbn = conv_cbn(window=3)
    cbn[1].cbn_name = 'layer1.0.bn1'
    bn = conv_bn(cbn)
    for step in range(4):
        x = torch.randn(2, 3, 6, 6, requires_grad=True)
        y = cp.checkpoint(cbn, x, use_reentrant=reentrant)
        y.pow(3).mean().backward()
        x_ref = x.detach().requires_grad_()
        y_ref = bn(x_ref)
        y_ref.pow(3).mean().backward()
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(x.grad, x_ref.grad)
        for p, q in zip(cbn.parameters(), bn.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
    assert cbn[1].iteration == 3
    assert int(cbn[1].num_batches_tracked) == 4
    torch.testing.assert_close(cbn[1].running_mean, bn[1].running_mean)
    assert [m for m in mmlogs.messages if 'layer1.0.bn1' in m][0]
    assert cbn[1].bindings[0].status == 'unbound'


def test_window_running_stats_change_only_the_running_statistics():
    """running_stats_from='window' trains exactly as the default (same
    outputs, gradients, weights) and differs in running_var only."""
    batch = conv_cbn(window=4, burnin=2)
    window = conv_cbn(window=4, burnin=2, running_stats_from='window')
    out_b, grad_b = sgd_steps(batch, 6, lr=0.01)
    out_w, grad_w = sgd_steps(window, 6, lr=0.01)
    for a, b in zip(out_b + sum(grad_b, []), out_w + sum(grad_w, [])):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name in ('weight', 'bias'):
        torch.testing.assert_close(getattr(batch[1], name),
                                   getattr(window[1], name))
    # the running statistics follow the window (values: the reference test)
    assert not torch.allclose(window[1].running_var, batch[1].running_var)
    torch.testing.assert_close(window[1].num_batches_tracked,
                               batch[1].num_batches_tracked)
    assert 'running_stats_from' in repr(window[1])
    assert 'running_stats_from' not in repr(batch[1])


def test_window_one_needs_no_epoch_length():
    """A window of 1 is BN at every iteration: burn-in in epochs is moot."""
    layer = CBN2d(4, window=1, burnin=2, burnin_by_epoch=True)
    layer.train()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(layer(x), F.batch_norm(
        x, None, None, layer.weight, layer.bias, True, 0.0, layer.eps))
