# Copyright (c) mmcbn contributors. All rights reserved.
"""The numerics on every device: CPU here, and CUDA wherever it exists.

The window normalization runs different kernels per device (CPU: BatchNorm's
native kernels with given statistics; CUDA: the kernels SyncBatchNorm uses).
Each is checked against a plain-autograd float64 reference of the method's
formula, for the layouts and dtypes a training run meets, and a whole CBN
trajectory against the independent reference of tests/reference_cbn.py.
On a machine without CUDA the CUDA cases are reported as skipped.
"""
import pytest
import torch

from mmcbn.functional import batch_stats, window_norm
from sync_counter import SyncCounter


def reference_window_norm(x, weight, bias, hist_count, hist_mean, hist_var,
                          eps):
    """The method note's window normalization with plain autograd ops, in
    float64 on the CPU (gradients through the current batch only)."""
    x = x.detach().cpu().double().requires_grad_()
    weight = weight.detach().cpu().double().requires_grad_()
    bias = bias.detach().cpu().double().requires_grad_()
    dims = (0, 2, 3)
    mu_t = x.mean(dims)
    nu_t = (x * x).mean(dims)
    mus, nus = [mu_t], [torch.maximum(nu_t, mu_t * mu_t)]
    for n, mu, var in zip(hist_count.tolist(), hist_mean.double().cpu(),
                          hist_var.double().cpu()):
        if n > 0:
            nu = var + mu * mu
            mus.append(mu)
            nus.append(torch.maximum(nu, mu * mu))
    mu_bar = torch.stack(mus).mean(0)
    var_bar = (torch.stack(nus).mean(0) - mu_bar * mu_bar).clamp(min=0)
    shape = (1, -1, 1, 1)
    y = (x - mu_bar.view(shape)) / torch.sqrt(var_bar.view(shape) + eps) \
        * weight.view(shape) + bias.view(shape)
    return y, x, weight, bias


CASES = [
    # (dtype of x, memory format, batch)
    (torch.float32, torch.contiguous_format, 4),
    (torch.float32, torch.channels_last, 4),
    (torch.float32, torch.contiguous_format, 1),
    (torch.float64, torch.contiguous_format, 3),
    (torch.float16, torch.contiguous_format, 4),
    (torch.bfloat16, torch.channels_last, 4),
]


@pytest.mark.parametrize('dtype,fmt,batch', CASES,
                         ids=[f'{c[0]}-{c[1]}-n{c[2]}'.replace('torch.', '')
                              for c in CASES])
def test_window_norm_matches_the_formula(device, dtype, fmt, batch):
    if device.type == 'cpu' and dtype == torch.float16:
        pytest.skip('float16 BatchNorm kernels are CUDA-only here: the CPU '
                    'trains float16 models under autocast with bfloat16')
    gen = torch.Generator().manual_seed(0)
    channels = 5
    x = (torch.randn(batch, channels, 6, 7, generator=gen) * 3 + 1)
    weight = torch.rand(channels, generator=gen) + 0.5
    bias = torch.randn(channels, generator=gen)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    hist_mean = torch.randn(3, channels, generator=gen, dtype=stats_dtype)
    hist_var = torch.rand(3, channels, generator=gen, dtype=stats_dtype) * 4
    hist_var[1, 0] = -0.5  # a compensated entry that needs the repair
    hist_count = torch.tensor([84.0, 0.0, 84.0], dtype=stats_dtype)
    grad = torch.randn(x.shape, generator=gen)

    xd = x.to(device, dtype).contiguous(memory_format=fmt).requires_grad_()
    # parameters: float32 (autocast keeps them so), float64 in a double model
    w = weight.to(device, stats_dtype).requires_grad_()
    b = bias.to(device, stats_dtype).requires_grad_()
    mean_t, var_t = batch_stats(xd)
    y, stats = window_norm(xd, w, b, mean_t, var_t, hist_count.to(device),
                           hist_mean.to(device), hist_var.to(device), 1e-5)
    assert y.dtype == dtype and y.device.type == device.type
    y.backward(grad.to(device, dtype))

    ref, rx, rw, rb = reference_window_norm(xd.to(torch.float64), weight,
                                            bias, hist_count, hist_mean,
                                            hist_var, 1e-5)
    ref.backward(grad.double())
    tol = dict(float64=1e-10, float32=1e-4, float16=2e-2,
               bfloat16=1e-1)[str(dtype).split('.')[1]]
    torch.testing.assert_close(y.double().cpu(), ref.detach(), rtol=tol,
                               atol=tol)
    torch.testing.assert_close(xd.grad.double().cpu(), rx.grad, rtol=tol,
                               atol=tol * 10)
    torch.testing.assert_close(w.grad.double().cpu(), rw.grad, rtol=tol,
                               atol=tol * 10)
    torch.testing.assert_close(b.grad.double().cpu(), rb.grad, rtol=tol,
                               atol=tol * 10)
    assert int(stats.k) == 3  # the current batch and two entries


def test_cbn_trajectory_matches_the_reference(device):
    """A whole float64 CBN training trajectory on ``device`` equals the
    independent reference (run on the CPU)."""
    from test_reference_trajectory import (assert_same_trajectory,
                                           build_pair, loss_fn)
    from test_reference_trajectory import batches as make_batches
    for kind in ('conv_stride2', 'conv_groups'):
        ours, ref = build_pair(kind, window=4, burnin=2)
        ours = ours.to(device)
        opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
        opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
        out_ours, out_ref = [], []
        for x, target in make_batches(kind, steps=12):
            for model, opt, out, dev in ((ours, opt_ours, out_ours, device),
                                         (ref, opt_ref, out_ref, 'cpu')):
                y = model(x.to(dev))
                loss = loss_fn(y, target.to(dev))
                opt.zero_grad()
                loss.backward()
                opt.step()
                out.append(y.detach().cpu())
        assert_same_trajectory(ours.cpu(), ref, out_ours, out_ref)


def test_training_step_makes_no_host_synchronization(device):
    """The no-sync rule on the device itself (on CUDA the counted
    operators would stall the stream)."""
    from test_gpu_model import build, step
    model = build('cbn', window=4, moment_stride=2).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for it in range(6):
        x = torch.randn(4, 3, 8, 8, generator=gen).to(device)
        if it == 5:
            with SyncCounter() as counter:
                step(model, x, opt)
            assert counter.total == 0, dict(counter.ops)
        else:
            step(model, x, opt)
        opt.step()
    assert model.n1.bindings[0].status == 'bound'
