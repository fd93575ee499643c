# Copyright (c) mmcbn contributors. All rights reserved.
"""benchmarks/host_overhead.py --quick: the aten ops of a layer-step.

Op counts are exact (no op of a training step depends on tensor values),
so they are asserted exactly: two counts agree, BatchNorm's equals what
``F.batch_norm`` dispatches, early burn-in equals window 1, and a
compensated CBN layer-step stays within the budget
:data:`host_overhead.OPS_BUDGET` (the regression guard of issue 18, the
count measured when it was set). The script's timings are smoke-tested only: they are finite numbers.
"""
import os.path as osp
import sys
from collections import Counter

import torch
import torch.nn.functional as F

from script_utils import ROOT, finite, run_quick

sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
import host_overhead  # noqa: E402


def plain_batch_norm_ops() -> Counter:
    """The non-view ops of ``F.batch_norm`` forward + backward in training
    mode (input, weight and bias gradients) and of the one other thing
    ``nn.BatchNorm2d.forward`` does in training: ``num_batches_tracked +=
    1`` (torch/nn/modules/batchnorm.py)."""
    c = host_overhead.SHAPE[1]
    x = torch.randn(host_overhead.SHAPE, requires_grad=True)
    weight = torch.ones(c, requires_grad=True)
    bias = torch.zeros(c, requires_grad=True)
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    tracked = torch.tensor(0, dtype=torch.long)
    grad = torch.randn(host_overhead.SHAPE)
    with host_overhead.OpCounter() as counter:
        tracked.add_(1)
        y = F.batch_norm(x, running_mean, running_var, weight, bias, True,
                         0.1, 1e-5)
        torch.autograd.backward(y, grad)
    return counter.ops


def test_host_overhead_quick(tmp_path):
    result, stdout = run_quick('host_overhead.py', tmp_path, png=False)
    rows = {r['variant']: r for r in result['rows'] + result['sync_rows']}
    assert list(rows) == list(host_overhead.VARIANTS) + list(
        host_overhead.SYNC_VARIANTS)
    for name, r in rows.items():
        # deterministic: two steps of the same variant dispatch the same ops
        assert r['same_ops_twice'], name
        assert r['ops_per_layer_step'] == r['ops_per_layer_step_repeat']
        assert sum(r['ops_by_name'].values()) == r['ops_per_layer_step']
        assert finite(r['host_us_per_layer_step']), name
    ops = {name: r['ops_per_layer_step'] for name, r in rows.items()}
    # BatchNorm's layer-step is F.batch_norm's ops, net of the convs
    assert rows['BN']['ops_by_name'] == dict(plain_batch_norm_ops())
    # window 1, and burn-in (recording only), do less than compensation;
    # so do naive CBN and the monitor off
    for cheaper in ('CBN w1', 'CBN w4 burn-in', 'CBN w4 naive'):
        assert ops[cheaper] < ops['CBN w4'], (cheaper, ops)
    assert ops['CBN w4 monitor'] > ops['CBN w4']
    # the window's length is data, not code: w4 and w8 dispatch the same
    assert rows['CBN w8']['ops_by_name'] == rows['CBN w4']['ops_by_name']
    # early in burn-in nothing is recorded (only the last window - 1
    # iterations of burn-in are): the ops of window 1, exactly
    assert rows['CBN w4 burn-in']['ops_by_name'] == \
        rows['CBN w1']['ops_by_name']
    # two processes: the same CBN, and SyncCBN adds its all-reduces
    assert ops['CBN w4 (2 processes)'] == ops['CBN w4']
    assert rows['SyncCBN w4 (2 processes)']['ops_by_name'].get(
        'allreduce_', 0) > 0
    # the regression guard (issue 18): lower OPS_BUDGET as ops are cut
    for name in ('CBN w4', 'CBN w8'):
        assert ops[name] <= host_overhead.OPS_BUDGET, (
            f'{name} dispatches {ops[name]} ops per layer-step, over the '
            f'budget of {host_overhead.OPS_BUDGET}: '
            f"{rows[name]['ops_by_name']}")
    assert result['budget']['ops_budget'] == host_overhead.OPS_BUDGET
    assert result['budget']['met']
    assert 'needs --device cuda' in stdout
