# Copyright (c) mmcbn contributors. All rights reserved.
"""A CUDA audit on a CPU-only torch: CBN and SyncCBN training steps with
tensors on ``cuda:0``.

A small compiled shim (``fake_cuda_shim.cpp``: a no-op CUDA device guard
and CUDA hooks, no kernels; compiled once, cached) lets autograd run on
tensors that claim device 'cuda' (``fake_cuda.FakeCudaTensor``, CPU values
inside), so mmcbn takes its CUDA branch (``x.is_cuda``) and calls CUDA's
``batch_norm_stats``, ``batch_norm_backward_reduce`` and
``batch_norm_backward_elemt``, which are emulated with their contracts.
Because the shim must be loaded before ``import torch``, the steps run in
one child process (``cuda_audit_child.py``, ``cuda_audit_steps.py``) and
this module checks its report.

Each scenario (CBN, SyncCBN in a fake world of 2; window 4 inside and
after burn-in; both backward rules; ``store_dtype='bfloat16'`` with
``moment_stride=2``; naive; fp16 and bf16 autocast acting on the fake
device; one image per rank; float64) must show no device mixing, no
host<->device copy, no CPU tensor made by mmcbn, no synchronizing
operator, no half-precision statistics, no CPU branch, no kernel contract
violation; each window normalization must have run the three CUDA kernels;
the window state must stay on the device in float32; and losses, outputs,
gradients and running statistics must equal those of the same steps on
plain CPU tensors (mmcbn's CPU branch).

Each mutant injects one fault into mmcbn's source (recompiled under its
own file name) or environment, and the audit must report it.
"""
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import time

import pytest
import torch

import mmcbn
from cuda_audit_child import MUTANTS, SCENARIOS

TESTS = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(osp.dirname(osp.abspath(mmcbn.__file__)))

pytestmark = [
    pytest.mark.skipif(
        torch.backends.cuda.is_built(),
        reason='a CUDA build of torch: the audit fakes CUDA on CPU-only '
        'builds (where CUDA is real, the CUDA tests run on it)'),
    pytest.mark.skipif(
        shutil.which(os.environ.get('CXX', 'c++')) is None,
        reason='no C++ compiler for the fake CUDA shim'),
]


@pytest.fixture(scope='module')
def audit(tmp_path_factory):
    """Build the shim (cached), run every scenario and mutant in one
    child process, and return its report."""
    import fake_cuda
    start = time.perf_counter()
    shim = fake_cuda.build_shim()
    built = time.perf_counter()
    out = tmp_path_factory.mktemp('cuda_audit') / 'audit.json'
    paths = [ROOT, TESTS] + [
        p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.run([
        sys.executable,
        osp.join(TESTS, 'cuda_audit_child.py'), shim,
        str(out)
    ],
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    print(f'\nCUDA audit: shim {built - start:.1f} s, steps '
          f'{time.perf_counter() - built:.1f} s')
    return report


def _show(findings):
    return '\n'.join(f'{category}: {message}'
                     for category, messages in findings.items()
                     for message in messages)


@pytest.mark.parametrize('name', list(SCENARIOS))
def test_cuda_training_step_passes_the_audit(audit, name):
    result = audit[name]
    assert result['findings'] == {}, _show(result['findings'])


@pytest.mark.parametrize('name', list(MUTANTS))
def test_the_audit_reports_an_injected_fault(audit, name):
    findings = audit[name]['findings']
    missing = set(MUTANTS[name]['expect']) - set(findings)
    assert not missing, f'{name}: {missing} not reported; ' \
        f'found:\n{_show(findings)}'


def test_the_child_sees_cuda_and_this_process_does_not(audit):
    """The shim is active only in the audit's process: this one (the rest
    of the suite) still has no CUDA and no accelerator."""
    assert not torch.cuda.is_available()
    assert torch.accelerator.current_accelerator() is None
    assert set(audit) == set(SCENARIOS) | set(MUTANTS)


# Found by the audit (its CPU reference could not run a bfloat16 model):
# once the window was on, normalize() called the CPU native_batch_norm with
# a half input and weight but float32 window statistics, which it rejects;
# BatchNorm2d trains the same model.
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_a_half_precision_model_trains_after_burn_in_on_the_cpu(dtype):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 1).to(dtype)
    layer = mmcbn.CBN2d(4, window=2).to(dtype)
    for it in range(3):
        mmcbn.set_cbn_iteration(layer, it)
        y = layer(conv(torch.randn(2, 3, 4, 4, dtype=dtype)))
        assert y.dtype == dtype
        y.float().square().mean().backward()
    # trained in the window (not BN), with finite half gradients
    assert len(layer._windows[0]) == 1
    for p in (conv.weight, layer.weight, layer.bias):
        assert p.grad.dtype == dtype and torch.isfinite(p.grad).all()
