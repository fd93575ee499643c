# Copyright (c) mmcbn contributors. All rights reserved.
"""MABN (the batch-2 baseline) and ConvWC against a float64 reference built
from the paper's equations (tests/reference_mabn.py), and BN's survival
list: eval, export, resume, checkpointing, autocast, channels-last, empty
batches, no host synchronization, bad arguments."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmcbn import MABN2d, ConvWC
from mmcbn.export import plain_state_dict
from mmcbn.mabn import centre_filters
from reference_mabn import ReferenceMABN, exact_grad_without_mean
from sync_counter import SyncCounter

SETTINGS = dict(eps=1e-5, momentum=0.1, buffer_size=4, sma_warmup=5,
                renorm_warmup=9, r_max=1.3)


def _inputs(steps, shape=(2, 3, 4, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        # a scale that grows, then falls: r leaves 1 and is clipped at
        # both ends
        scale = 1 + 0.3 * t if t < 11 else 0.3
        out.append((torch.randn(shape, generator=gen, dtype=torch.float64) *
                    scale + 0.2,
                    torch.randn(shape, generator=gen, dtype=torch.float64)))
    return out


@pytest.mark.parametrize('sma_warmup', [5, 1])
def test_training_follows_the_float64_reference(sma_warmup):
    """Forward, the moving-average backward, the affine gradients and the
    running variance over warm-ups, a filling (``sma_warmup`` 1 < the
    buffer), full and wrapping history, r = 1, r free and r clipped at
    both ends; gamma and beta change every step."""
    steps = 16
    settings = dict(SETTINGS, sma_warmup=sma_warmup)
    layer = MABN2d(3, **settings).double().train()
    ref = ReferenceMABN(3, settings['eps'], settings['momentum'],
                        settings['buffer_size'], settings['sma_warmup'],
                        settings['renorm_warmup'], settings['r_max'])
    clipped = [0, 0]
    for t, (x, g) in enumerate(_inputs(steps)):
        gamma = layer.weight.detach().clone()
        beta = layer.bias.detach().clone()
        run_before = ref.run.clone()
        y_ref, dx_ref, dgamma_ref, dbeta_ref = ref.step(x, g, gamma, beta)
        x = x.clone().requires_grad_(True)
        layer.weight.grad = layer.bias.grad = None
        y = layer(x)
        y.backward(g)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, dx_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.weight.grad, dgamma_ref, rtol=1e-10,
                                   atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, dbeta_ref, rtol=1e-10,
                                   atol=1e-12)
        torch.testing.assert_close(layer.running_var, ref.run, rtol=1e-12,
                                   atol=1e-12)
        assert torch.count_nonzero(layer.running_mean) == 0
        if t >= SETTINGS['renorm_warmup']:
            sigma2 = torch.stack(ref.chis[-4:]).mean(0)
            r = torch.sqrt(sigma2 + 1e-5) / torch.sqrt(run_before + 1e-5)
            clipped[0] += int((r > 1.3).sum())
            clipped[1] += int((r < 1 / 1.3).sum())
        with torch.no_grad():  # the parameters move, as in training
            layer.weight.add_(0.05 * torch.randn(3, dtype=torch.float64))
            layer.bias.add_(0.05 * torch.randn(3, dtype=torch.float64))
    assert min(clipped) > 0  # both ends of the clip were exercised
    assert int(layer.num_batches_tracked) == steps


def test_warmup_backward_is_the_exact_gradient():
    """During the warm-up MABN is x / sqrt(E[x^2] + eps), exactly."""
    layer = MABN2d(3, sma_warmup=3, renorm_warmup=3).double().train()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        layer.bias.copy_(torch.tensor([0.1, 0.0, -0.3]))
    for x, g in _inputs(3):
        want = exact_grad_without_mean(x, g, layer.weight, layer.bias, 1e-5)
        x = x.clone().requires_grad_(True)
        layer.weight.grad = layer.bias.grad = None
        y = layer(x)
        y.backward(g)
        got = (y.detach(), x.grad, layer.weight.grad, layer.bias.grad)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_after_warmup_the_backward_is_not_the_batch_gradient():
    """The moving average replaces psi: the input gradient then differs
    from the batch's own (the statistic the method stabilizes)."""
    layer = MABN2d(3, buffer_size=4, sma_warmup=2,
                   renorm_warmup=100).double().train()
    for t, (x, g) in enumerate(_inputs(6)):
        x = x.clone().requires_grad_(True)
        layer(x).backward(g)
    want = exact_grad_without_mean(x.detach(), g, layer.weight, layer.bias,
                                   1e-5)[1]
    assert not torch.allclose(x.grad, want, rtol=1e-3, atol=1e-6)


def test_eval_is_batchnorm_with_zero_mean_and_exports_exactly():
    layer = MABN2d(3, buffer_size=2, sma_warmup=1, renorm_warmup=2).train()
    for x, g in _inputs(5, seed=1):
        layer(x.float().requires_grad_(True)).backward(g.float())
    layer.eval()
    bn = nn.BatchNorm2d(3).eval()
    state = plain_state_dict(layer.state_dict())
    assert not {'mabn_chi', 'mabn_psi'} & set(state)
    bn.load_state_dict(state)  # strict: exactly BN's keys
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(layer(x), bn(x))
    want = x / torch.sqrt(layer.running_var.view(1, 3, 1, 1) + 1e-5) * \
        layer.weight.view(1, 3, 1, 1) + layer.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(layer(x), want)


def test_conv_wc_centres_its_filters_and_exports_as_a_plain_conv():
    torch.manual_seed(0)
    conv = ConvWC(3, 4, 3, padding=1, bias=True)
    x = torch.randn(2, 3, 5, 5)
    w_hat = conv.weight - conv.weight.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(conv(x), F.conv2d(x, w_hat, conv.bias,
                                                 padding=1))
    assert torch.allclose(w_hat.mean((1, 2, 3)), torch.zeros(4), atol=1e-7)
    # the parameter itself is kept (a resume is exact); the export centres
    assert not torch.allclose(conv.weight.mean((1, 2, 3)), torch.zeros(4))
    plain = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    plain.load_state_dict(plain_state_dict(conv.state_dict()))  # strict
    assert torch.equal(plain(x), conv(x))
    # the gradient reaches the raw parameter through the centring: it has
    # zero mean per filter
    conv(x).square().sum().backward()
    assert torch.allclose(conv.weight.grad.mean((1, 2, 3)), torch.zeros(4),
                          atol=1e-5)
    # a plain convolution's checkpoint (pretrained weights) loads into it
    again = ConvWC(3, 4, 3, padding=1, bias=True)
    again.load_state_dict(plain.state_dict())
    torch.testing.assert_close(again.weight, plain.weight)


def test_centre_filters_matches_the_forward_for_linear_shapes():
    w = torch.randn(5, 7)
    torch.testing.assert_close(centre_filters(w).mean(1), torch.zeros(5),
                               atol=1e-6, rtol=0)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(ConvWC(3, 6, 3, padding=1, bias=False),
                         MABN2d(6, buffer_size=3, sma_warmup=2,
                                renorm_warmup=4), nn.ReLU(),
                         ConvWC(6, 4, 3, padding=1, bias=False),
                         MABN2d(4, buffer_size=3, sma_warmup=2,
                                renorm_warmup=4))


def _train(model, opt, batches):
    model.train()
    for x in batches:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run():
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 3, 6, 6, generator=gen) for _ in range(10)]
    a = _net()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    _train(a, opt_a, batches)
    b = _net()
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    _train(b, opt_b, batches[:5])
    buf = io.BytesIO()
    torch.save(dict(model=b.state_dict(), opt=opt_b.state_dict()), buf)
    buf.seek(0)
    saved = torch.load(buf)
    c = _net(seed=1)  # other initial weights: all must come from the file
    opt_c = torch.optim.SGD(c.parameters(), lr=0.1, momentum=0.9)
    c.load_state_dict(saved['model'])
    opt_c.load_state_dict(saved['opt'])
    assert c[1]._steps == 5
    _train(c, opt_c, batches[5:])
    for (k, va), vc in zip(a.state_dict().items(), c.state_dict().values()):
        assert torch.equal(va, vc), k


def test_deepcopy_keeps_the_iteration():
    a = _net()
    _train(a, torch.optim.SGD(a.parameters(), lr=0.1), [torch.randn(2, 3, 6,
                                                                    6)] * 3)
    assert copy.deepcopy(a)[1]._steps == 3


def test_activation_checkpointing_equals_the_plain_run():
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(2, 3, 6, 6, generator=gen) for _ in range(6)]
    results = []
    for mode in (None, True, False):
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x in batches:
            opt.zero_grad()
            x = x.requires_grad_(True)
            y = model(x) if mode is None else checkpoint(
                model, x, use_reentrant=mode)
            y.square().mean().backward()
            opt.step()
        assert model[1]._steps == len(batches)  # one step per iteration
        results.append(model.state_dict())
    for other in results[1:]:
        for k, v in results[0].items():
            torch.testing.assert_close(other[k], v, rtol=0, atol=0, msg=k)


def test_channels_last_and_autocast_keep_float32_statistics():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    a, b = _net(), _net()
    ya = a(x)
    yb = b(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(ya, yb)
    c = _net()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        yc = c(x)
        yc.float().square().mean().backward()
    for m in (c[1], c[4]):
        for buf in (m.running_var, m.mabn_chi, m.mabn_psi):
            assert buf.dtype == torch.float32
        assert torch.count_nonzero(m.mabn_psi) > 0
    torch.testing.assert_close(c[4].running_var, a[4].running_var, rtol=0.05,
                               atol=1e-3)


def test_an_empty_batch_changes_nothing_and_keeps_the_graph():
    layer = MABN2d(3).train()
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert layer._steps == 0
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_training_step_makes_no_host_synchronization():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(6)
    for it in range(6):  # past both warm-ups
        x = torch.randn(2, 3, 6, 6, generator=gen)
        if it < 5:
            _train(model, opt, [x])
            continue
        with SyncCounter() as counter:
            opt.zero_grad()
            model(x).square().mean().backward()
        assert counter.total == 0, dict(counter.ops)
    assert model[1]._steps == 6


@pytest.mark.parametrize('kwargs, word', [
    (dict(eps=0), 'eps'), (dict(momentum=0), 'momentum'),
    (dict(momentum=None), 'momentum'), (dict(buffer_size=0), 'buffer_size'),
    (dict(sma_warmup=-1), 'sma_warmup'),
    (dict(renorm_warmup=1.5), 'renorm_warmup'), (dict(r_max=0.5), 'r_max')
])
def test_bad_arguments_name_the_value(kwargs, word):
    with pytest.raises(ValueError, match=f'MABN {word}'):
        MABN2d(4, **kwargs)


def test_bad_input_names_the_shape():
    with pytest.raises(ValueError, match='4D input'):
        MABN2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match='num_features=3'):
        MABN2d(3)(torch.randn(2, 4, 2, 2))


def test_registered_for_mmcv_builders():
    from mmcv.cnn import build_conv_layer, build_norm_layer
    name, layer = build_norm_layer(dict(type='MABN', buffer_size=8), 16)
    assert name == 'bn' and isinstance(layer, MABN2d)
    assert layer.buffer_size == 8
    conv = build_conv_layer(dict(type='ConvWC'), 3, 8, 3)
    assert isinstance(conv, ConvWC)
