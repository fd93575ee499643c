# Copyright (c) mmcbn contributors. All rights reserved.
"""Non-finite statistics: exact semantics, checked by outputs and state.

- A batch with a non-finite statistic is not stored in the window, and
  does not update the running statistics (``running_mean``,
  ``running_var`` and ``num_batches_tracked`` stay as they were): the
  following iterations equal, to the last bit of state, a run that never
  saw that batch (the optimizer skips its step, as mixed precision does).
- An earlier entry whose *compensated* statistics are not finite is
  dropped, and the window averages the remaining entries (the current batch
  included): the output and the ``'window'`` running statistics equal the
  float64 reference computed over the kept entries only.
"""
import pytest
import torch
from torch import nn

from mmcbn import CBN2d, read_cbn_flags, set_cbn_iteration
from reference_cbn import (compensated_moments, module_apply, moments,
                           normalize, window_average)

BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')
BAD_ITERATION = 4


def train_with_a_bad_batch(bad, skip, groups=1, steps=8, **cbn):
    """conv + CBN trained with SGD in float64. At ``BAD_ITERATION`` one
    input value is ``bad`` (no optimizer step follows), or with ``skip``
    that iteration does not happen at all.

    Returns:
        tuple: the model, {iteration: output} and {iteration: buffers after
        the iteration}.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=groups),
        CBN2d(4, **cbn)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    outputs, buffers = {}, {}
    for it in range(steps):
        x = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
        x = x * (1 + 0.1 * it) + 0.2 * it
        coef = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
        if it == BAD_ITERATION:
            if skip:
                continue
            x[0, 0, 2, 2] = bad
        set_cbn_iteration(model, it)
        y = model(x)
        outputs[it] = y.detach()
        buffers[it] = {n: getattr(model[1], n).clone() for n in BUFFERS}
        if it == BAD_ITERATION:
            continue  # a non-finite loss: the step is skipped
        loss = (y * coef).sum() + (y**3).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, outputs, buffers


CONFIGS = [
    dict(window=1),  # plain BatchNorm path
    dict(window=4, burnin=6),  # burn-in: BatchNorm path with recording
    dict(window=4),
    dict(window=4, momentum=None),
    dict(window=4, running_stats_from='window'),
    dict(window=3, momentum=None, running_stats_from='window'),
]


@pytest.mark.parametrize('bad', [float('inf'), float('nan')])
@pytest.mark.parametrize('cbn', CONFIGS,
                         ids=['-'.join(f'{k}={v}' for k, v in c.items())
                              for c in CONFIGS])
def test_nonfinite_batch_is_neither_stored_nor_tracked(bad, cbn):
    model, out, buf = train_with_a_bad_batch(bad, skip=False, **cbn)
    twin, out_twin, buf_twin = train_with_a_bad_batch(bad, skip=True, **cbn)
    # the bad batch's output is not finite, and nothing was tracked
    assert not torch.isfinite(out[BAD_ITERATION]).all()
    for name in BUFFERS:
        assert torch.equal(buf[BAD_ITERATION][name],
                           buf[BAD_ITERATION - 1][name]), name
    flags = read_cbn_flags(model, warn=False)['1']
    assert flags['skipped'] == 1
    assert flags['not_stored'] == (1 if cbn['window'] > 1 else 0)
    assert read_cbn_flags(twin, warn=False) == {}
    # every later iteration equals a run that never saw the batch
    for it in range(BAD_ITERATION + 1, 8):
        assert torch.isfinite(out[it]).all()
        torch.testing.assert_close(out[it], out_twin[it], rtol=1e-12,
                                   atol=1e-12, msg=lambda m: f'{it}: {m}')
        for name in BUFFERS:
            torch.testing.assert_close(buf[it][name], buf_twin[it][name],
                                       rtol=1e-12, atol=1e-12)
    assert int(model[1].num_batches_tracked) == 7
    if cbn['window'] > 1 and cbn.get('burnin', 0) <= BAD_ITERATION:
        # not trivial: a window that kept the batch would differ
        assert len(model[1]._windows[0]) == cbn['window'] - 1


def test_partly_nonfinite_record_is_dropped_whole():
    """A depthwise producer makes only channel 0 non-finite: the whole
    record is left out, for every channel."""
    model, out, _ = train_with_a_bad_batch(float('inf'), skip=False,
                                           groups=4, window=4)
    _, out_twin, _ = train_with_a_bad_batch(float('inf'), skip=True,
                                            groups=4, window=4)
    bad = out[BAD_ITERATION]
    assert not torch.isfinite(bad[:, 0]).all()
    assert torch.isfinite(bad[:, 1:]).all()
    for it in range(BAD_ITERATION + 1, 8):
        torch.testing.assert_close(out[it], out_twin[it], rtol=1e-12,
                                   atol=1e-12)


# ------------------------------------------------- dropping some entries
SPIKE, GROWTH = 1e19, 30.0


@pytest.mark.parametrize('running_stats_from', ['batch', 'window'])
def test_overflowing_entry_is_dropped_and_the_rest_averaged(
        running_stats_from):
    """float32: iteration 3 sees a spike batch (huge but finite
    statistics: stored), then the weights grow 30x. At iteration 5 that
    entry's compensated second moment overflows, the entries of 2 and 4 do
    not: the layer averages 2, 4 and 5, as the float64 reference over the
    kept entries does, and with ``'window'`` running statistics pools their
    values only (momentum 1: the running statistics are the update)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1, bias=False)
    layer = CBN2d(4, window=4, momentum=1.0,
                  running_stats_from=running_stats_from)
    model = nn.Sequential(conv, layer)
    gen = torch.Generator().manual_seed(0)
    record, inputs = {}, {}
    for it in range(6):
        set_cbn_iteration(model, it)
        x = torch.randn(2, 3, 2, 2, generator=gen)
        if it == 3:
            x = x * SPIKE
        if it == 5:
            with torch.no_grad():
                conv.weight.mul_(GROWTH)
        inputs[it] = x
        record[it] = {'weight': conv.weight.detach().clone().double()}
        feature = conv(x)
        y = layer(feature)
        flags = read_cbn_flags(model, warn=False).get('1', {})
        # preconditions: every record is stored, only iteration 5 drops
        assert flags.get('not_stored', 0) == 0
        assert flags.get('dropped', 0) == (1 if it == 5 else 0), (it, flags)
    assert torch.isfinite(y).all()

    apply = module_apply(nn.Conv2d(3, 4, 1, bias=False).double())
    mus, nus = [moments(feature.detach().double())[0]], [
        moments(feature.detach().double())[1]
    ]
    for s in (4, 2):  # lags 1 and 3; the spike (lag 2) is dropped
        mu, nu = compensated_moments(apply, inputs[s].double(), record[s],
                                     record[5])
        mus.append(mu)
        nus.append(nu)
    mean, var = window_average(mus, nus)
    expected = normalize(feature.detach().double(), mean, var, layer.eps)
    torch.testing.assert_close(y.detach().double(), expected, rtol=1e-4,
                               atol=1e-4)
    # averaging a zeroed entry as a fourth one would be far off
    mean4, var4 = window_average(mus + [mus[0] * 0], nus + [nus[0] * 0])
    assert (normalize(feature.detach().double(), mean4, var4, layer.eps) -
            expected).abs().max() > 0.1
    m = feature.numel() // feature.shape[1]
    if running_stats_from == 'window':
        n = 3 * m  # the values of the three kept entries
        torch.testing.assert_close(layer.running_mean.double(), mean,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var.double(),
                                   var * n / (n - 1), rtol=1e-4, atol=1e-4)
    else:
        batch_mean, batch_nu = moments(feature.detach().double())
        torch.testing.assert_close(layer.running_mean.double(), batch_mean,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            layer.running_var.double(),
            (batch_nu - batch_mean**2) * m / (m - 1), rtol=1e-4, atol=1e-4)
    assert int(layer.num_batches_tracked) == 6
