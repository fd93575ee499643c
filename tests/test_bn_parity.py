# Copyright (c) mmcbn contributors. All rights reserved.
"""Every input nn.BatchNorm2d trains on, CBN (and SyncCBN outside a
distributed run) trains on too (issue 11, "Parity with BatchNorm").

Where CBN must be BatchNorm (window 1, burn-in, an empty window) it is
compared with an ``nn.BatchNorm2d`` twin holding the same weights; where it
must not be, with the same CBN model on an equivalent input (contiguous vs
channels-last, float32 vs autocast, a twin that took another path), and
its outputs, gradients, running statistics and window entries must be
finite, of BN's shapes and memory formats.
"""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from mmdet.models.layers import ExpMomentumEMA
from mmengine.config import Config
from mmengine.model import ExponentialMovingAverage
from mmcv.cnn import build_norm_layer
from mmengine.runner import Runner
from torch import nn

from mmcbn import (CBN2d, CBNHook, SyncCBN2d, binding_summary, cbn_layers,
                   read_cbn_flags, set_cbn_iteration, window_statistics)
from tiny_cbn import TwoBlockNet, tiny_config

LAYERS = {'CBN': CBN2d, 'SyncCBN': SyncCBN2d}
CL = torch.channels_last


def build(layer='CBN', seed=0, **kw):
    torch.manual_seed(seed)
    return TwoBlockNet(lambda c: LAYERS[layer](c, **kw))


def bn_twin(model):
    torch.manual_seed(0)
    bn = TwoBlockNet(nn.BatchNorm2d)
    bn.load_state_dict(model.state_dict())  # strict: the same keys
    return bn


def data(n=2, size=6, steps=1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=gen) * 2 + 0.5
            for _ in range(steps)]


def loss_of(y):
    if not y.numel():
        return y.sum()
    weights = torch.linspace(-1, 1, y[0].numel()).view_as(y[0])
    return (y * weights).sum() + (y**4).mean()


def train(model, xs, opt=None, iterations=None):
    """SGD steps; returns the outputs and the gradients of every step."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05)
    outs, grads = [], []
    for i, x in enumerate(xs):
        if iterations is not None:
            set_cbn_iteration(model, iterations[i])
        y = model(x)
        opt.zero_grad()
        loss_of(y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        outs.append(y.detach())
    return outs, grads


def norms(model):
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def assert_layer_state_finite(layer):
    for name in ('running_mean', 'running_var'):
        assert torch.isfinite(getattr(layer, name)).all(), name
    for position, state in enumerate(layer._windows):
        for name, buf in state._buffers.items():
            if buf.is_floating_point():
                assert torch.isfinite(buf).all(), (position, name)


def assert_same_as_bn(cbn, bn, outs_c, outs_b, grads_c, grads_b, tol=1e-5):
    for a, b in zip(outs_c, outs_b):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for ga, gb in zip(grads_c, grads_b):
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert len(norms(cbn)) == len(norms(bn)) == 2
    for lc, lb in zip(norms(cbn), norms(bn)):
        for name in ('running_mean', 'running_var', 'num_batches_tracked'):
            torch.testing.assert_close(getattr(lc, name), getattr(lb, name),
                                       rtol=tol, atol=tol)


def compare_with_bn(cbn, bn, xs, tol=1e-5):
    outs_c, grads_c = train(cbn, xs)
    outs_b, grads_b = train(bn, xs)
    assert_same_as_bn(cbn, bn, outs_c, outs_b, grads_c, grads_b, tol)


def snapshot_windows(layer):
    return [{k: v.clone() for k, v in s._buffers.items()}
            for s in layer._windows]


# --------------------------------------------------------------- empty batch
@pytest.mark.parametrize('layer', sorted(LAYERS))
def test_empty_batch_first_is_batchnorm(layer):
    """N = 0 (an RoI head that sampled no RoI) at the very first iteration:
    an empty output, running statistics unchanged, num_batches_tracked
    counted as BN does, zero gradients; the next batches train as BN."""
    cbn = build(layer, window=4)
    bn = bn_twin(cbn)
    xs = [torch.randn(0, 3, 6, 6)] + data(steps=2)
    outs_c, grads_c = train(cbn, xs[:1])
    assert outs_c[0].shape == (0, 6, 3, 3)
    assert all(float(g.abs().sum()) == 0 for g in grads_c[0])
    for n in norms(cbn):
        assert float(n.running_mean.abs().max()) == 0
        assert float((n.running_var - 1).abs().max()) == 0
        assert int(n.num_batches_tracked) == 1  # as nn.BatchNorm2d counts
        assert len(n._windows[0]) == 0  # nothing recorded
    more = train(cbn, xs[1:2])
    outs_c, grads_c = outs_c + more[0], grads_c + more[1]
    outs_b, grads_b = train(bn, xs[:2])
    assert outs_b[0].shape == outs_c[0].shape
    # iteration 1 has no earlier entry (the empty batch left none): BN
    assert_same_as_bn(cbn, bn, outs_c, outs_b, grads_c, grads_b)
    # iteration 2 uses iteration 1's entry
    y, y_bn = cbn(xs[2]), bn(xs[2])
    assert torch.isfinite(y).all()
    assert not torch.allclose(y, y_bn, atol=1e-3)
    assert [int(n.num_batches_tracked) for n in norms(cbn)] == [3, 3]
    for n in norms(cbn):
        assert_layer_state_finite(n)


@pytest.mark.parametrize('layer', sorted(LAYERS))
@pytest.mark.parametrize('hook', [False, True])
def test_empty_batch_mid_run_keeps_and_uses_the_window(layer, hook):
    """With full windows an empty batch changes no running statistic and
    no window entry; the next non-empty iteration uses the entries still
    inside its window, exactly like a twin that never saw the empty batch.
    """
    window, fill = 4, 6
    runs = [build(layer, window=window) for _ in range(2)]
    for model in runs:  # identical deterministic histories
        train(model, data(steps=fill),
              iterations=list(range(fill)) if hook else None)
    model, twin = runs
    before = [(n.running_mean.clone(), n.running_var.clone(),
               int(n.num_batches_tracked), snapshot_windows(n))
              for n in norms(model)]
    if hook:
        set_cbn_iteration(model, fill)
    empty = model(torch.randn(0, 3, 6, 6))
    assert empty.shape == (0, 6, 3, 3)
    loss_of(empty).backward()
    for n, (mean, var, tracked, windows) in zip(norms(model), before):
        torch.testing.assert_close(n.running_mean, mean, rtol=0, atol=0)
        torch.testing.assert_close(n.running_var, var, rtol=0, atol=0)
        assert int(n.num_batches_tracked) == tracked + 1  # as BatchNorm
        assert len(n._windows[0]) == window - 1
        for name, buf in n._windows[0]._buffers.items():
            torch.testing.assert_close(buf, windows[0][name], rtol=0,
                                       atol=0)
    assert read_cbn_flags(model) == {}
    # iteration fill + 1: lags 2 and 3 are in the window (lag 1 was empty)
    x = data(steps=1, seed=7)[0]
    if hook:
        set_cbn_iteration(model, fill + 1)
    set_cbn_iteration(twin, fill + 1)  # the twin skips iteration `fill`
    assert set(window_statistics(model, model.n1, iteration=fill + 1)) == {
        2, 3}
    out, twin_out = model(x), twin(x)
    torch.testing.assert_close(out, twin_out, rtol=0, atol=0)
    plain = bn_twin(model)(x)
    assert not torch.allclose(out, plain, atol=1e-3)  # the window counts
    assert torch.isfinite(out).all()


def test_synccbn_window_one_is_mmcv_syncbn_outside_distributed():
    """mmcv's SyncBN trains outside a distributed run: so does SyncCBN, as
    the same layer, on full, single-sample, empty and channels-last
    batches (built by mmcv's build_norm_layer, as configs do)."""
    def net(cfg):
        torch.manual_seed(0)
        return TwoBlockNet(lambda c: build_norm_layer(cfg, c)[1])

    ours = net(dict(type='SyncCBN', window=1))
    theirs = net(dict(type='SyncBN'))
    assert isinstance(ours.n1, SyncCBN2d)
    theirs.load_state_dict(ours.state_dict())
    xs = data(steps=2) + data(n=1, steps=1) + [torch.randn(0, 3, 6, 6)] + [
        x.contiguous(memory_format=CL) for x in data(steps=2, seed=3)]
    compare_with_bn(ours, theirs, xs)


# ------------------------------------------------------------ single sample
@pytest.mark.parametrize('layer', sorted(LAYERS))
def test_single_sample_with_several_positions(layer):
    xs = data(n=1, steps=5)
    cbn1 = build(layer, window=1)
    bn = bn_twin(cbn1)
    compare_with_bn(cbn1, bn, xs)
    cbn = build(layer, window=4)
    outs, grads = train(cbn, xs)
    for y, g in zip(outs, grads):
        assert y.shape == (1, 6, 3, 3) and torch.isfinite(y).all()
        assert all(torch.isfinite(t).all() for t in g)
    for n in norms(cbn):
        assert n.bindings[0].status == 'bound'
        assert len(n._windows[0]) == 3
        assert_layer_state_finite(n)
    # one value per channel: BatchNorm's error, and CBN's
    for norm in (nn.BatchNorm2d(3), LAYERS[layer](3, window=4)):
        with pytest.raises(ValueError, match='more than 1 value per channel'):
            norm(torch.randn(1, 3, 1, 1))


# ----------------------------------------------------------- memory formats
def assert_same_memory_format(a, b):
    assert a.is_contiguous() == b.is_contiguous()
    assert a.is_contiguous(memory_format=CL) == b.is_contiguous(
        memory_format=CL)


@pytest.mark.parametrize('layer', sorted(LAYERS))
@pytest.mark.parametrize('window', [1, 4])
def test_channels_last_matches_contiguous_and_bn_formats(layer, window):
    xs = data(steps=6)
    dense = build(layer, window=window)
    last = build(layer, window=window).to(memory_format=CL)
    bn = bn_twin(dense).to(memory_format=CL)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05)
            for m in (dense, last, bn)]
    for x in xs:
        results = []
        for model, opt in zip((dense, last, bn), opts):
            inp = x.clone() if model is dense else x.contiguous(
                memory_format=CL)
            inp.requires_grad_()
            y = model(inp)
            opt.zero_grad()
            loss_of(y).backward()
            opt.step()
            results.append((y, inp.grad))
        (y_d, g_d), (y_l, g_l), (y_b, g_b) = results
        assert_same_memory_format(y_l, y_b)
        assert_same_memory_format(g_l, g_b)
        torch.testing.assert_close(y_l, y_d, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(g_l, g_d, rtol=1e-4, atol=1e-5)
        if window == 1:
            torch.testing.assert_close(y_l, y_b, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g_l, g_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(norms(last), norms(dense)):
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-4,
                                   atol=1e-5)
        assert_layer_state_finite(a)
        if window > 1:
            assert a.bindings[0].status == 'bound'
            assert len(a._windows[0]) == window - 1


@pytest.mark.parametrize('layer', sorted(LAYERS))
def test_non_contiguous_inputs_match_contiguous_ones(layer):
    """A strided/transposed view as the producer's input, and as the input
    of a CBN layer on raw data: the same numbers as contiguous copies."""
    gen = torch.Generator().manual_seed(3)
    views, dense = [], []
    for _ in range(5):
        big = torch.randn(4, 3, 12, 10, generator=gen)
        view = big[::2, :, 1::2, ::2].transpose(2, 3)  # (2, 3, 5, 6)
        assert not view.is_contiguous()
        views.append(view)
        dense.append(view.contiguous())
    strided, plain = build(layer, window=4), build(layer, window=4)
    out_s, grad_s = train(strided, views)
    out_p, grad_p = train(plain, dense)
    for a, b in zip(out_s + sum(grad_s, []), out_p + sum(grad_p, [])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert strided.n1.bindings[0].status == 'bound'
    # a CBN layer directly on (non-contiguous) data, window 1 = BN
    raw, bn = LAYERS[layer](3, window=1), nn.BatchNorm2d(3)
    for view in views:
        torch.testing.assert_close(raw(view), bn(view))
    torch.testing.assert_close(raw.running_var, bn.running_var)


# ------------------------------------------------------------------ autocast
@pytest.mark.parametrize('layer', sorted(LAYERS))
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_cpu_autocast_half_inputs(layer, dtype):
    xs = data(steps=6)
    # window 1 under autocast is BatchNorm under autocast
    cbn1 = build(layer, window=1)
    bn = bn_twin(cbn1)
    with torch.autocast('cpu', dtype=dtype):
        compare_with_bn(cbn1, bn, xs[:3], tol=1e-3)
    # window 4 with the weights held (lr 0): the same window statistics
    # as in float32, up to the half-precision input
    half, full = build(layer, window=4), build(layer, window=4)
    with torch.autocast('cpu', dtype=dtype):
        out_h, _ = train(half, xs, torch.optim.SGD(half.parameters(), lr=0))
        y_bn = bn_twin(half)(xs[0])
    out_f, _ = train(full, xs, torch.optim.SGD(full.parameters(), lr=0))
    assert out_h[0].dtype == y_bn.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    for a, b in zip(out_h, out_f):
        torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol)
    assert not torch.allclose(out_f[-1], bn_twin(full)(xs[-1]), atol=1e-2)
    # and training under autocast: bound, finite, float32 statistics
    half = build(layer, window=4)
    with torch.autocast('cpu', dtype=dtype):
        out_h, grad_h = train(half, xs)
    for y, g in zip(out_h, grad_h):
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert all(torch.isfinite(t).all() for t in g)
    for n in norms(half):
        assert n.bindings[0].status == 'bound'
        assert len(n._windows[0]) == 3
        assert n.running_var.dtype == torch.float32
        for name, buf in n._windows[0]._buffers.items():
            if buf.is_floating_point():
                assert buf.dtype == torch.float32, name
        assert_layer_state_finite(n)


# --------------------------------------------------- inputs that need no grad
def pooled_norm(xs, layer):
    """BatchNorm over the concatenation of the last batches (what an exact
    window is for equal batch sizes)."""
    cat = torch.cat(xs)
    mean = cat.mean((0, 2, 3))
    var = cat.var((0, 2, 3), unbiased=False)
    return F.batch_norm(xs[-1], mean, var, layer.weight, layer.bias, False,
                        0.0, layer.eps)


@pytest.mark.parametrize('layer', sorted(LAYERS))
def test_frozen_producer_and_raw_data_use_the_exact_window(layer):
    """Inputs that need no grad in a training model: a frozen conv, and raw
    data. Past statistics are exact, so the window is BatchNorm over the
    last ``window`` batches pooled, and the layer's own affine trains."""
    window = 3
    cbn = build(layer, window=window)
    cbn.c1.requires_grad_(False)
    on_data = LAYERS[layer](3, window=window)
    seen = {}
    cbn.n1.register_forward_hook(
        lambda mod, args, out: seen.update(inp=args[0].detach(), out=out))
    feats, inputs = [], []
    opt = torch.optim.SGD([p for p in cbn.parameters() if p.requires_grad] +
                          list(on_data.parameters()), lr=0.05)
    for x in data(steps=6):
        y, z = cbn(x), on_data(x)
        inputs.append(x)
        feats.append(seen['inp'])
        assert not seen['inp'].requires_grad
        torch.testing.assert_close(z, pooled_norm(inputs[-window:], on_data),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen['out'],
                                   pooled_norm(feats[-window:], cbn.n1),
                                   rtol=1e-5, atol=1e-5)
        opt.zero_grad()
        (loss_of(y) + loss_of(z)).backward()
        for grad in (cbn.n1.weight.grad, on_data.weight.grad):
            assert grad is not None and torch.isfinite(grad).all()
        opt.step()
    assert cbn.n1.bindings[0].status == 'frozen'
    assert on_data.bindings[0].status == 'frozen'
    assert cbn.n2.bindings[0].status == 'bound'
    assert len(cbn.n1._windows[0]) == len(on_data._windows[0]) == 2


@pytest.mark.parametrize('layer', sorted(LAYERS))
def test_no_grad_training_call_is_batchnorm_and_training_resumes(
        layer, mmlogs):
    """A training-mode call under torch.no_grad cannot bind: it is BN (the
    output and the running statistics of a BN twin), warns once naming the
    layer, and the next iterations train with the window again."""
    window = 3
    cbn = build(layer, window=window)
    for name, n in cbn_layers(cbn):
        n.cbn_name = name
    train(cbn, data(steps=4))
    bn = bn_twin(cbn)
    x = data(steps=1, seed=5)[0]
    for _ in range(2):
        with torch.no_grad():
            y, y_bn = cbn(x), bn(x)
        torch.testing.assert_close(y, y_bn, rtol=1e-5, atol=1e-5)
    for a, b in zip(norms(cbn), norms(bn)):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked)
        assert a.bindings[0].status == 'unbound'
        assert_layer_state_finite(a)
    warned = [m for m in mmlogs.messages if m.startswith('n1 found no')]
    assert len(warned) == 1 and 'grad mode is off' in warned[0]
    outs, grads = train(cbn, data(steps=window - 1, seed=6))
    assert all(torch.isfinite(t).all() for t in outs + sum(grads, []))
    assert cbn.n1.bindings[0].status == 'bound'
    assert len(cbn.n1._windows[0]) == window - 1  # refilled
    y, y_bn = cbn(x), bn_twin(cbn)(x)
    assert torch.isfinite(y).all()
    assert not torch.allclose(y, y_bn, atol=1e-3)  # the window is used


@pytest.mark.parametrize('layer', sorted(LAYERS))
def test_no_grad_training_call_keeps_the_window(layer):
    """A training-mode call under torch.no_grad (a teacher or EMA forward
    of the training model) cannot bind, so it is BatchNorm and records
    nothing, but it says nothing about the producer: the recorded entries
    stay, and the next training forward equals one without that call."""
    runs = []
    for teacher_call in (False, True):
        model = build(layer, window=4)
        xs = data(steps=6)
        train(model, xs[:4], iterations=range(4))
        if teacher_call:
            set_cbn_iteration(model, 4)
            with torch.no_grad():
                model(data(seed=7)[0])
            assert model.n1.bindings[0].status == 'unbound'
        set_cbn_iteration(model, 5)
        runs.append((model, model(xs[5])))
    (plain, y_plain), (taught, y_taught) = runs
    assert len(taught.n1._windows[0]) == len(plain.n1._windows[0]) == 3
    assert torch.equal(y_taught, y_plain)
    # ... and the window is not a no-op there
    assert not torch.allclose(y_plain, bn_twin(plain)(xs[5]), atol=1e-3)


@pytest.mark.parametrize('frozen', [
    False,
    pytest.param(True, marks=pytest.mark.xfail(
        strict=True,
        reason='a frozen producer is keyed by its shape and arguments only '
        '(binding.py: no parameter id for a frozen weight), so two frozen '
        'convs of one shape share a window key and a switch between them '
        'keeps the entries of the other'))
])
def test_switching_producers_of_one_shape_starts_the_window_afresh(frozen):
    """One CBN layer fed by conv A for a few iterations, then by conv B of
    the same shape (a branch chosen per batch): A's statistics do not
    describe B's output, so the first call after the switch is BatchNorm
    on the batch (the window starts afresh). The trainable case is the
    control: the test can pass."""
    torch.manual_seed(0)
    stem = nn.Conv2d(3, 3, 3, padding=1)  # trainable: x has a graph
    convs = [nn.Conv2d(3, 4, 3, padding=1) for _ in range(2)]
    with torch.no_grad():
        convs[1].weight.mul_(3)
        convs[1].bias.add_(2)
    for conv in convs:
        conv.requires_grad_(not frozen)
    norm = CBN2d(4, window=4)
    for x in data(steps=3):
        norm(convs[0](stem(x)))
    assert norm.bindings[0].status == ('frozen' if frozen else 'bound')
    assert len(norm._windows[0]) == 3
    h = convs[1](stem(data(seed=9)[0]))
    expected = F.batch_norm(h, None, None, norm.weight, norm.bias, True, 0.0,
                            norm.eps)
    torch.testing.assert_close(norm(h), expected)


# ---------------------------------------------------------- train/eval mode
@pytest.mark.parametrize('layer', sorted(LAYERS))
def test_eval_mid_run_is_batchnorm_and_keeps_the_window(layer):
    runs = [build(layer, window=4) for _ in range(2)]
    for model in runs:
        train(model, data(steps=5))
    model, twin = runs
    windows = [snapshot_windows(n) for n in norms(model)]
    iters = [n.iteration for n in norms(model)]
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    bn = bn_twin(model).eval()
    for x in data(n=3, steps=3, seed=4):
        torch.testing.assert_close(model(x), bn(x), rtol=0, atol=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, buffers[k], rtol=0, atol=0)
    assert [n.iteration for n in norms(model)] == iters
    for n, saved in zip(norms(model), windows):
        for name, buf in n._windows[0]._buffers.items():
            torch.testing.assert_close(buf, saved[0][name], rtol=0, atol=0)
    model.train()
    more = data(steps=3, seed=8)
    out_m, grad_m = train(model, more)
    out_t, grad_t = train(twin, more)
    for a, b in zip(out_m + sum(grad_m, []), out_t + sum(grad_t, [])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(model.n2._windows[0]) == 3


# ----------------------------------------------------------- copies and EMA
def pickled(model):
    return pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize('layer', sorted(LAYERS))
@pytest.mark.parametrize('copier', [copy.deepcopy, pickled])
def test_copy_with_full_windows_trains_on_identically(layer, copier):
    """A copy keeps its windows: the entries name the producer by its
    parameters' ids, which the copy rebinds to its own producer."""
    model = build(layer, window=4)
    train(model, data(steps=5))
    copied = copier(model)
    for a, b in zip(norms(model), norms(copied)):
        assert len(b._windows[0]) == 3
        for name, buf in a._windows[0]._buffers.items():
            other = b._windows[0]._buffers[name]
            assert other.data_ptr() != buf.data_ptr()  # not shared
            torch.testing.assert_close(other, buf, rtol=0, atol=0)
    more = data(steps=4, seed=11)
    fresh = build(layer, window=4)  # the same weights, empty windows
    fresh.load_state_dict(copied.state_dict())
    y_fresh = fresh(more[0])
    out_m, grad_m = train(model, more)
    out_c, grad_c = train(copied, more)
    for a, b in zip(out_m + sum(grad_m, []), out_c + sum(grad_c, [])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for n in norms(copied):
        assert len(n._windows[0]) == 3 and n.bindings[0].status == 'bound'
        # bound to the copy's own producer
        assert n.bindings[0].weight_id in {id(p) for p in copied.parameters()}
    # and the copy used its window at once (it was not BatchNorm)
    assert not torch.allclose(out_c[0], y_fresh, atol=1e-3)


@pytest.mark.parametrize('ema_type', [ExponentialMovingAverage,
                                      ExpMomentumEMA])
def test_ema_copy_of_a_model_with_full_windows(ema_type):
    """mmengine's/mmdet's EMA deep-copy the model (mmdet's EMAHook does):
    the copy's windows are its own, the model trains on as if no EMA
    existed, and the averaged model is BatchNorm in eval mode (its state
    dict loads strictly into a BN model)."""
    model, twin = build(window=4), build(window=4)
    xs = data(steps=9)
    train(model, xs[:5])
    train(twin, xs[:5])
    ema = ema_type(model, momentum=0.2)
    opt_m = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_t = torch.optim.SGD(twin.parameters(), lr=0.05)
    for x in xs[5:]:
        out_m, _ = train(model, [x], opt_m)
        out_t, _ = train(twin, [x], opt_t)
        torch.testing.assert_close(out_m[0], out_t[0], rtol=0, atol=0)
        ema.update_parameters(model)
    averaged = ema.module
    for a, b in zip(norms(averaged), norms(model)):
        assert not set(v.data_ptr() for v in a._windows[0]._buffers.values()
                       ) & set(v.data_ptr()
                               for v in b._windows[0]._buffers.values())
        torch.testing.assert_close(a.running_var, b.running_var)
    assert not torch.allclose(averaged.c1.weight, model.c1.weight)
    averaged.eval()
    bn = bn_twin(averaged).eval()
    x = data(n=3, steps=1, seed=12)[0]
    torch.testing.assert_close(ema(x), bn(x), rtol=0, atol=0)
    # a training-mode call of the (frozen) copy is finite and exact-window
    averaged.train()
    for x in data(steps=3, seed=13):
        assert torch.isfinite(ema(x)).all()
    assert averaged.n1.bindings[0].status == 'frozen'
    for n in norms(averaged):
        assert_layer_state_finite(n)


def test_ema_hook_in_a_runner(tmp_path):
    cfg = tiny_config(tmp_path, max_epochs=2)
    cfg['custom_hooks'].append(
        dict(type='EMAHook', ema_type='ExpMomentumEMA', momentum=0.01))
    cfg['default_scope'] = 'mmdet'  # where ExpMomentumEMA is registered
    runner = Runner.from_cfg(Config(cfg))
    runner.train()
    ckpt = torch.load(str(tmp_path / 'epoch_2.pth'))
    ema_state = {k[len('module.'):]: v
                 for k, v in ckpt['ema_state_dict'].items()
                 if k.startswith('module.')}
    for _, layer in cbn_layers(runner.model):
        assert len(layer._windows[0]) == 2
    assert all(torch.isfinite(v).all() for v in ema_state.values()
               if v.is_floating_point())
    from tiny_cbn import TinyCBNNet
    bn_model = TinyCBNNet(dict(type='BN'))
    bn_model.load_state_dict(ema_state)  # strict


# ------------------------------------------------------------ torch.compile
@pytest.mark.parametrize('backend', ['eager', 'aot_eager', 'inductor'])
def test_torch_compile_runs_every_layer_as_batchnorm(backend):
    """Inside torch.compile there is no autograd graph to bind to: every
    CBN layer runs as BatchNorm and says so (``_compiled`` and the binding
    summary)."""
    torch._dynamo.reset()
    cbn = build(window=4)
    bn = bn_twin(cbn)
    compiled = torch.compile(cbn, backend=backend)
    xs = data(steps=4)
    res_c, res_b = train(compiled, xs), train(bn, xs)
    assert_same_as_bn(cbn, bn, res_c[0], res_b[0], res_c[1], res_b[1])
    for _, layer in cbn_layers(cbn):
        assert layer._compiled
        assert not layer._windows or len(layer._windows[0]) == 0
    summary = binding_summary(cbn)
    assert '2 ran as BatchNorm inside torch.compile' in summary
    # outside compile the same model is CBN again
    outs, _ = train(cbn, data(steps=3, seed=2))
    assert cbn.n1.bindings[0].status == 'bound'
    torch._dynamo.reset()


def compile_runner(work_dir, compile_cfg):
    cfg = tiny_config(work_dir, max_epochs=1)
    cfg['experiment_name'] = f'compile_{work_dir.name}'
    if compile_cfg is not None:
        cfg['compile'] = compile_cfg
    return Runner.from_cfg(Config(cfg))


def compile_warnings(messages):
    return [m for m in messages
            if m.startswith('CBNHook: the model is compiled')]


@pytest.mark.parametrize('compile_cfg', [None, False, True, dict(),
                                         dict(backend='eager')])
def test_hook_warns_once_when_the_runner_compiles(tmp_path, mmlogs,
                                                  compile_cfg):
    """mmengine compiles ``train_step`` when the config has ``compile``
    (True or a dict of options, even an empty one): CBNHook says once that
    the layers then run as BatchNorm."""
    runner = compile_runner(tmp_path, compile_cfg)
    hook = CBNHook()
    hook.before_train(runner)
    expected = 0 if compile_cfg is None or compile_cfg is False else 1
    assert len(compile_warnings(mmlogs.messages)) == expected


def test_compiled_runner_trains_as_batchnorm_and_warns_once(tmp_path,
                                                            mmlogs):
    torch._dynamo.reset()
    runner = compile_runner(tmp_path, dict(backend='eager'))
    runner.train()
    warned = compile_warnings(mmlogs.messages)
    assert len(warned) == 1 and 'BatchNorm (window 1)' in warned[0]
    for _, layer in cbn_layers(runner.model):
        assert layer._compiled
        assert torch.isfinite(layer.running_var).all()
    assert any('ran as BatchNorm inside torch.compile' in m
               for m in mmlogs.messages if m.startswith('CBN: '))
    torch._dynamo.reset()
