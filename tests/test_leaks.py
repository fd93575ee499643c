# Copyright (c) mmcbn contributors. All rights reserved.
"""Nothing accumulates per iteration: after the windows are full, a long
training loop (with health monitoring and flag reads) keeps the same live
tensors and Python objects (benchmarks/soak.py measures memory in the
demo Mask R-CNN)."""
import gc

import torch

from mmcbn import (read_cbn_flags, read_cbn_health, set_cbn_iteration,
                   set_cbn_monitor)
from test_gpu_model import build, step


def live_objects():
    gc.collect()
    objects = gc.get_objects()
    return (sum(1 for o in objects if isinstance(o, torch.Tensor)),
            len(objects))


def test_no_growth_per_iteration():
    model = build('cbn', window=4, moment_stride=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    counts = {}
    for it in range(160):
        set_cbn_iteration(model, it)
        set_cbn_monitor(model, it % 10 == 0)
        step(model, torch.randn(4, 3, 8, 8, generator=gen), opt)
        opt.step()
        if it % 10 == 0:
            read_cbn_health(model)
            read_cbn_flags(model)
        if it in (40, 159):
            counts[it] = live_objects()
    (tensors_40, objects_40), (tensors_159, objects_159) = counts.values()
    assert tensors_159 == tensors_40, counts
    # a leak of one object per iteration would add 119; allow the test's
    # own bookkeeping a few
    assert objects_159 <= objects_40 + 10, counts
    assert len(model.n1._windows[0]) == 3
