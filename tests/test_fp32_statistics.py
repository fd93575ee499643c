# Copyright (c) mmcbn contributors. All rights reserved.
"""Statistics stay float32 under autocast, and CUDA's statistics kernel's
contract (checked on the CPU through an emulation of its rule).

Under fp16 autocast (``AmpOptimWrapper``, ``--amp`` on CUDA) every matmul
runs in half precision: the lag matching and the compensation would make
counts, means and variances fp16, and a count above 65504 (a detector's
stage-1 layer has ~134k values per channel) would become inf. CPU autocast
casts the same ops (to bf16, or to fp16 when asked), so the CPU sees it.
"""
import pytest
import torch
from torch import nn

import mmcbn.functional as functional
from mmcbn import CBN1d, CBN2d

#: Values per channel above fp16's largest finite number (65504).
BIG = (2, 2, 200, 200)  # 80000 per channel


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('window_grad', [True, False])
def test_window_state_is_float32_under_autocast(dtype, window_grad):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 1)
    layer = CBN2d(3, window=3, window_grad=window_grad)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(BIG, generator=gen) * 2 + 1 for _ in range(4)]
    opt = torch.optim.SGD(conv.parameters(), lr=1e-3)
    for x in xs:
        with torch.autocast('cpu', dtype=dtype):
            y = layer(conv(x))
        assert y.dtype == dtype  # the layer keeps its input's dtype
        opt.zero_grad()
        y.float().square().mean().backward()
        opt.step()
    state = layer._windows[0]
    for name, buf in state._buffers.items():
        if buf.is_floating_point():
            assert buf.dtype == torch.float32, name
    assert (state._buffers['count'] == 80000).all()
    with torch.autocast('cpu', dtype=dtype):
        x = conv(xs[0])
        out = layer(x)
    for t in (layer.running_mean, layer.running_var):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    assert torch.isfinite(out).all()
    # the layer's own statistics equal a float32 recomputation
    mean_t, var_t = functional.batch_stats(x.detach())
    ref_mean = x.detach().float().mean((0, 2, 3))
    torch.testing.assert_close(mean_t, ref_mean, rtol=1e-5, atol=1e-5)
    assert mean_t.dtype == var_t.dtype == torch.float32


def test_history_counts_exact_under_autocast_in_the_forward():
    """The counts the normalization uses come out of a matmul with the
    lag matching: inside the layer's forward they are exact float32."""
    seen = []
    real = functional.window_norm

    def spy(x, weight, bias, cur_mean, cur_var, hist_count, *args, **kw):
        seen.append(hist_count.clone())
        return real(x, weight, bias, cur_mean, cur_var, hist_count, *args,
                    **kw)

    import mmcbn.cbn as cbn_module
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 1)
    layer = CBN2d(3, window=3)
    gen = torch.Generator().manual_seed(0)
    try:
        cbn_module.window_norm = spy
        for _ in range(3):
            with torch.autocast('cpu', dtype=torch.float16):
                layer(conv(torch.randn(BIG, generator=gen)))
    finally:
        cbn_module.window_norm = real
    assert seen, 'the window normalization did not run'
    last = seen[-1]
    assert last.dtype == torch.float32
    assert torch.equal(last, torch.full_like(last, 80000.))


def test_linear_producer_under_autocast():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    layer = CBN1d(3, window=3)
    for _ in range(4):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = layer(lin(torch.randn(8, 4)))
        y.float().sum().backward()
    buffers = layer._windows[0]._buffers
    assert buffers['var_grad'].dtype == torch.float32
    assert buffers['a_mean'].dtype == torch.float32


def cuda_rule_batch_norm_stats(x, eps):
    """CUDA's ``batch_norm_stats`` on CPU values: float mean and
    ``invstd = (var + eps)^-1/2``, and 0 where ``var + eps == 0``."""
    xs = x.float()
    mean = xs.mean((0, 2, 3))
    var = xs.var((0, 2, 3), unbiased=False)
    total = var + eps
    invstd = torch.where(total == 0, torch.zeros_like(total),
                         total.rsqrt())
    return mean, invstd


def test_constant_channel_has_zero_variance_with_cuda_s_rule(monkeypatch):
    monkeypatch.setattr(torch, 'batch_norm_stats',
                        cuda_rule_batch_norm_stats)
    x = torch.randn(2, 3, 4, 4)
    x[:, 1] = 0.5  # one value per channel (or a constant image pool)
    mean, var = functional.welford_stats(x)
    assert torch.isfinite(var).all()
    assert 0 <= var[1] < 1e-20  # (not inf)
    ref_mean, ref_var = torch.batch_norm_update_stats(x, None, None, 0.0)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=1e-7)
    # the same kernel called with eps = 0, as before, gives inf here
    _, invstd = cuda_rule_batch_norm_stats(x, 0.0)
    assert torch.isinf(invstd.pow(-2)[1])


def test_small_variances_survive_the_eps_round_trip(monkeypatch):
    monkeypatch.setattr(torch, 'batch_norm_stats',
                        cuda_rule_batch_norm_stats)
    x = torch.randn(4, 2, 3, 3) * torch.tensor([1e-4, 1e3]).view(1, 2, 1, 1)
    _, var = functional.welford_stats(x)
    ref = x.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(var, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize('form', ['exact', 'fast'])
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_upstream_state_is_float32_under_autocast(dtype, form):
    """compensate='upstream': the feeding norms' derivatives and state
    (and the matmuls that apply them) stay float32 under autocast, and
    training stays finite."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), CBN2d(3, window=3,
                                             compensate='upstream'),
        nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1),
        CBN2d(4, window=3, compensate='upstream', upstream_form=form))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(2, 2, 8, 8, generator=gen) * 2 + 1
        with torch.autocast('cpu', dtype=dtype):
            y = model(x)
        opt.zero_grad()
        y.float().square().mean().backward()
        opt.step()
        assert torch.isfinite(y).all()
    assert model[4].bindings[0].upstream_followed == 1
    state = model[4]._windows[0]._buffers
    assert {'up_state'} | ({'up_hm', 'up_hc'} if form == 'exact' else
                           {'up_pu', 'up_dv', 'up_rho'}) <= set(state)
    for name, buf in state.items():
        if buf.is_floating_point():
            assert buf.dtype == torch.float32, name
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
