# Copyright (c) mmcbn contributors. All rights reserved.
"""float32 precision when a channel's mean is large against its spread.

The compensated variance of an earlier entry is computed as
``var_s + Gc_s . (W - W_s) - (shift of the mean)^2`` with the centered
moment gradient ``Gc_s``: algebraically the method's ``nu(W) - mu(W)^2``,
but without subtracting two numbers of the size of ``mu^2``.
"""

import pytest
import torch
from torch import nn

from mmcbn import CBN2d, window_statistics

def drifting_windows(dtype, offset):
    """A conv with a large bias (mean ``offset`` x its spread) whose weights
    drift; the window statistics at iteration 5 (window 4)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), CBN2d(6, window=4))
    with torch.no_grad():
        model[0].bias.fill_(offset)
    model = model.to(dtype)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(2, 3, 8, 8, generator=gen).to(dtype)
        model(x)
        with torch.no_grad():
            step = 0.01 * torch.randn(model[0].weight.shape, generator=gen)
            model[0].weight.add_(step.to(dtype))
            model[0].bias.add_(0.01)
    return window_statistics(model, model[1], 0, 5)

@pytest.mark.parametrize('offset', [1.0, 100.0, 1000.0])
def test_compensated_variance_keeps_float32_precision(offset):
    exact = drifting_windows(torch.float64, offset)
    fast = drifting_windows(torch.float32, offset)
    assert set(exact) == set(fast) == {1, 2, 3}
    for lag in exact:
        var64 = exact[lag][1]
        var32 = fast[lag][1].double()
        rel = ((var32 - var64).abs() / var64).max().item()
        # the spread is ~1; the mean ~offset: nu - mu^2 in float32 would
        # lose about offset^2 * 6e-8 (0.06 at offset 1000)
        assert rel < 1e-4, (offset, lag, rel)
        mean_rel = ((fast[lag][0].double() - exact[lag][0]).abs() /
                    exact[lag][0].abs()).max().item()
        assert mean_rel < 1e-5

def test_the_uncentered_form_would_lose_it():
    """The control: the same numbers through ``nu - mu^2`` in float32."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64) + 1000.0
    var64 = x.var((0, 2, 3), unbiased=False)
    x32 = x.float()
    nu = (x32 * x32).mean((0, 2, 3))
    mu = x32.mean((0, 2, 3))
    rel = ((nu - mu * mu).double() - var64).abs() / var64
    assert rel.max() > 1e-2
