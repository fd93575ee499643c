# Copyright (c) mmcbn contributors. All rights reserved.
"""The three rules that decide which statistics a CBN layer uses, pinned
with explicit iteration numbers from the method note
(``shared/docs/cbn-method.md``), not derived from mmcbn:

- "Burn-in": ``burnin=3`` uses a window of 1 at iterations 0, 1 and 2 and
  the full window from iteration 3 on, with the statistics recorded during
  burn-in;
- "Window average and validity": the window counts the current iteration,
  so ``window=4`` at iteration 10 uses the entries of iterations 7, 8 and 9
  (and 10 itself), never 6;
- "Running statistics and inference": the running statistics follow the
  current batch (BatchNorm's unbiased variance over its ``m`` values); with
  ``running_stats_from='window'`` they follow the window statistics, with
  the unbiased variance over every value pooled in the window.

Every iteration ``s`` feeds a batch whose channel means are known functions
of ``s`` (``s`` and ``s^2 / 8``) around a fixed zero-mean pattern of unit
variance. The input depends on no trainable parameter, so the window is
exact (no compensation), and the mean and variance a layer normalized with,
read back from its output, identify the iterations it used.
"""
import pytest
import torch

from mmcbn import CBN2d, set_cbn_iteration
from reference_cbn import ReferenceCBN, pooled_count, window_at, window_lags

EPS = 1e-5


def channel_means(s):
    return torch.tensor([float(s), s * s / 8.0], dtype=torch.float64)


def batch_of(s, images=2):
    """Iteration ``s``'s batch: (images, 2, 2, 2), per channel the mean
    above plus a +-1 pattern (mean 0, biased variance 1)."""
    pattern = torch.tensor([1., -1., -1., 1.], dtype=torch.float64).view(
        1, 1, 2, 2).expand(images, 2, 2, 2)
    return pattern + channel_means(s).view(1, 2, 1, 1)


def used_statistics(x, y):
    """(mean, variance) a layer normalized ``x`` with, from its output
    ``y = (x - mean) / sqrt(var + eps)`` (affine weight 1, bias 0)."""
    hi = x[0, :, 0, 0]  # pattern +1
    lo = x[0, :, 0, 1]  # pattern -1
    scale = (hi - lo) / (y[0, :, 0, 0] - y[0, :, 0, 1])  # sqrt(var + eps)
    mean = hi - y[0, :, 0, 0] * scale
    return mean, scale.square() - EPS


def expected_statistics(iterations):
    """Window mean and variance of the batches of ``iterations`` (each of
    biased variance 1 around its means, weighted equally)."""
    means = torch.stack([channel_means(s) for s in iterations])
    mean = means.mean(0)
    return mean, 1.0 + (means - mean).square().mean(0)


def run(layer, iterations, images=None, tell=True):
    """Feed ``batch_of(s)`` at each iteration ``s``; return {s: (used mean,
    used variance, running mean, running var)}."""
    seen = {}
    for s in iterations:
        if tell:
            set_cbn_iteration(layer, s)
        x = batch_of(s, 2 if images is None else images[s])
        y = layer(x)
        seen[s] = used_statistics(x, y.detach()) + (
            layer.running_mean.clone(), layer.running_var.clone())
    return seen


def assert_uses(seen, t, iterations):
    mean, var = expected_statistics(iterations)
    got_mean, got_var = seen[t][:2]
    torch.testing.assert_close(
        got_mean, mean, rtol=1e-8, atol=1e-8,
        msg=lambda m: f'iteration {t} should use {iterations}: {m}')
    torch.testing.assert_close(got_var, var, rtol=1e-8, atol=1e-8)


def new_layer(**kw):
    layer = CBN2d(2, eps=EPS, **kw).double()
    layer.train()
    return layer


@pytest.mark.parametrize('tell', [True, False],
                         ids=['set_cbn_iteration', 'counted'])
def test_burnin_3_is_window_1_at_0_1_2_and_full_from_3(tell):
    layer = new_layer(window=4, burnin=3)
    seen = run(layer, range(7), tell=tell)
    assert layer.bindings[0].status == 'frozen'  # exact: no compensation
    for t in (0, 1, 2):
        assert_uses(seen, t, [t])
    # the entries recorded during burn-in fill the window at once
    assert_uses(seen, 3, [0, 1, 2, 3])
    assert_uses(seen, 4, [1, 2, 3, 4])
    assert_uses(seen, 6, [3, 4, 5, 6])


@pytest.mark.parametrize('iterations,used', [
    (range(11), [7, 8, 9, 10]),
    ([3, 6, 8, 9, 10], [8, 9, 10]),  # 6 is 4 iterations back: outside
    ([5, 7, 10], [7, 10]),
    ([2, 6, 10], [10]),
])
def test_window_4_at_iteration_10_uses_7_8_9(iterations, used):
    layer = new_layer(window=4)
    seen = run(layer, iterations)
    assert_uses(seen, 10, used)


def test_window_8_uses_the_current_iteration_and_the_7_before():
    layer = new_layer(window=8)
    seen = run(layer, range(12))
    assert_uses(seen, 11, list(range(4, 12)))
    assert_uses(seen, 3, [0, 1, 2, 3])  # fewer while fewer exist


def test_running_statistics_follow_the_current_batch_by_default():
    """momentum=1: the running statistics are the last update itself."""
    layer = new_layer(window=4, momentum=1.0)
    images = {s: 1 + s % 3 for s in range(6)}
    seen = run(layer, range(6), images)
    for t in range(6):
        m = images[t] * 4  # values per channel of the current batch
        torch.testing.assert_close(seen[t][2], channel_means(t))
        torch.testing.assert_close(seen[t][3],
                                   torch.full((2, ), m / (m - 1.0),
                                              dtype=torch.float64))
    assert_uses(seen, 5, [2, 3, 4, 5])  # while normalizing with the window


def test_window_running_statistics_pool_every_value_of_the_window():
    """running_stats_from='window': the window mean, and its variance made
    unbiased over all the values pooled in the window (the sum of the
    entries' counts, whatever each batch's size)."""
    layer = new_layer(window=3, burnin=2, momentum=1.0,
                      running_stats_from='window')
    images = {s: 1 + s % 3 for s in range(7)}  # 1, 2, 3, 1, 2, 3, 1 images
    seen = run(layer, range(7), images)
    windows = {0: [0], 1: [1], 2: [0, 1, 2], 3: [1, 2, 3], 4: [2, 3, 4],
               5: [3, 4, 5], 6: [4, 5, 6]}
    for t, used in windows.items():
        assert_uses(seen, t, used)
        mean, var = expected_statistics(used)
        n = sum(images[s] * 4 for s in used)
        torch.testing.assert_close(seen[t][2], mean)
        torch.testing.assert_close(seen[t][3], var * n / (n - 1),
                                   msg=lambda m: f'iteration {t}: {m}')
    # e.g. iteration 5 pools 1 + 2 + 3 images of 4 values: 24, not 3 x 8
    assert sum(images[s] * 4 for s in windows[5]) == 24


def test_reference_rules_are_the_notes():
    """The reference states the three rules on its own (tests of the test
    helper: the numbers are the note's)."""
    assert [window_at(t, 4, 3) for t in range(5)] == [1, 1, 1, 4, 4]
    assert [10 - lag for lag in window_lags(window_at(10, 4, 0))] == [9, 8, 7]
    assert list(window_lags(8)) == [1, 2, 3, 4, 5, 6, 7]
    assert list(window_lags(1)) == []
    assert pooled_count([8, 4, 12], 'batch') == 8
    assert pooled_count([8, 4, 12], 'window') == 24


def test_reference_follows_the_same_windows():
    """The reference on the same batches uses the same iterations."""
    ref = ReferenceCBN(torch.nn.Identity(), 2, window=4, burnin=3,
                       eps=EPS).double()
    seen = {}
    for s in [0, 1, 2, 3, 5, 6, 8, 9, 10]:
        ref.start_iteration(s)
        x = batch_of(s)
        seen[s] = used_statistics(x, ref(x).detach())
    for t, used in {2: [2], 3: [0, 1, 2, 3], 6: [3, 5, 6],
                    10: [8, 9, 10]}.items():
        mean, var = expected_statistics(used)
        torch.testing.assert_close(seen[t][0], mean)
        torch.testing.assert_close(seen[t][1], var)
