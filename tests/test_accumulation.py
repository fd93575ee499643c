# Copyright (c) mmcbn contributors. All rights reserved.
"""Gradient accumulation: inside a cycle the weights do not change, so the
window over its micro-batches is exact (CmBN comes free with CBN)."""
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner
from torch import nn

from mmcbn import CBN2d, set_cbn_accumulation, set_cbn_iteration
from mmcbn import window_statistics
from tiny_cbn import tiny_config

N = 4  # micro-batches per optimizer step


def bn_with_stats(x, layer, mean, var):
    shape = (1, -1, 1, 1)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + layer.eps) \
        * layer.weight.view(shape) + layer.bias.view(shape)


def accumulate(window, in_cycles, cycles=4, seed=0, tell=True):
    """Train conv + CBN with batch 1 and N micro-batches per step; yield
    (iteration, micro-batch index, model, conv outputs of the cycle so far,
    output, weight at the start of the micro-batch)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1),
                          CBN2d(6, window=window))
    if tell:
        set_cbn_accumulation(model, N, window_in_cycles=in_cycles)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for cycle in range(cycles):
        seen = []
        for j in range(N):
            it = cycle * N + j
            set_cbn_iteration(model, it)
            x = torch.randn(1, 3, 5, 5, generator=gen) * (1 + j) + j
            weight_then = model[0].weight.detach().clone()
            y = model(x)
            seen.append(model[0](x).detach())
            ((y * torch.randn(y.shape, generator=gen)).sum() / N).backward()
            yield it, j, model, list(seen), y.detach(), weight_then
        opt.step()
        opt.zero_grad()


def test_last_micro_batch_uses_the_exact_accumulated_statistics():
    """window = N micro-batches: at the last micro-batch of a cycle the
    layer normalizes with the statistics of the whole accumulated batch,
    exactly (the in-cycle entries get no compensation)."""
    checked = 0
    for it, j, model, seen, y, weight_then in accumulate(N, False):
        if j != N - 1 or it < N:
            continue
        acc = torch.cat(seen)
        mean, var = acc.mean((0, 2, 3)), acc.var((0, 2, 3), unbiased=False)
        torch.testing.assert_close(y, bn_with_stats(seen[-1], model[1],
                                                    mean, var),
                                   rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked == 3


def _in_cycle_entries(tell):
    """(exact, recorded) statistics pairs of in-cycle window entries."""
    pairs = []
    for it, j, model, seen, y, weight_then in accumulate(N, False, 3,
                                                         tell=tell):
        if it < N or j in (0, N - 1):
            continue
        layer = model[1]
        # the weights have not changed since the micro-batch began
        assert torch.equal(model[0].weight.detach(), weight_then)
        stats = window_statistics(model, layer, 0, it + 1)
        buf = layer._windows[0]._buffers
        for slot, rec_it in enumerate(layer._windows[0].iterations):
            lag = it + 1 - rec_it
            if lag in stats and rec_it // N == (it + 1) // N:
                pairs.append((stats[lag], buf['raw_mean'][slot].clone(),
                              buf['raw_var'][slot].clone()))
    return pairs


def test_in_cycle_entries_get_no_compensation():
    """Their weight difference is exactly zero, and the window uses their
    recorded statistics bit for bit (no Taylor term at all)."""
    pairs = _in_cycle_entries(tell=True)
    assert len(pairs) >= 4
    for (mean, var, _), raw_mean, raw_var in pairs:
        assert torch.equal(mean, raw_mean)
        assert torch.equal(var, raw_var.clamp(min=0))
    # the control: not told about the cycles, the layer compensates them
    # (a Taylor term of zero weight change, which is not bit-exact)
    untold = _in_cycle_entries(tell=False)
    assert not all(torch.equal(m, r) for (m, _, _), r, _ in untold)


def test_window_in_cycles_is_cross_mini_batch_normalization():
    """window = 1 cycle: micro-batch j normalizes with the exact
    statistics of micro-batches 0..j of its cycle (YOLOv4's CmBN)."""
    for it, j, model, seen, y, _ in accumulate(1, True):
        acc = torch.cat(seen)
        mean, var = acc.mean((0, 2, 3)), acc.var((0, 2, 3), unbiased=False)
        torch.testing.assert_close(y, bn_with_stats(seen[-1], model[1],
                                                    mean, var),
                                   rtol=1e-5, atol=1e-5)
    assert model[1].capacity == N - 1


@HOOKS.register_module()
class RecordConv1Norm(Hook):
    """Records conv1.bn's input and output at every iteration."""

    priority = 'LOWEST'

    def __init__(self):
        self.records = []

    def before_train(self, runner):
        layer = runner.model.conv1.bn
        self._handle = layer.register_forward_hook(
            lambda mod, args, out: self.records.append(
                (runner.iter, args[0].detach().clone(), out.detach().clone(),
                 mod.weight.detach().clone(), mod.bias.detach().clone())))


def test_runner_with_accumulative_counts(tmp_path, mmlogs):
    """mmengine's accumulative_counts=4, batch 1, window 4: CBNHook sets
    the cycles; each cycle's last micro-batch is normalized with the exact
    statistics of the accumulated batch."""
    probe = RecordConv1Norm()
    cfg = tiny_config(tmp_path, max_epochs=2,
                      norm_cfg=dict(type='CBN', window=N))
    cfg['train_dataloader']['batch_size'] = 1
    cfg['optim_wrapper']['accumulative_counts'] = N
    cfg['custom_hooks'].append(probe)
    runner = Runner(**cfg)
    runner.train()
    assert any('accumulate over 4 micro-batches' in m
               for m in mmlogs.messages)
    assert runner.model.conv1.bn.cycle_length == N
    checked = 0
    for start in range(N, len(probe.records), N):
        cycle = probe.records[start:start + N]
        inputs = torch.cat([r[1] for r in cycle])
        it, x, y, gamma, beta = cycle[-1]
        mean = inputs.mean((0, 2, 3))
        var = inputs.var((0, 2, 3), unbiased=False)
        shape = (1, -1, 1, 1)
        exact = (x - mean.view(shape)) / torch.sqrt(
            var.view(shape) + 1e-5) * gamma.view(shape) + beta.view(shape)
        torch.testing.assert_close(y, exact, rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked == 3
