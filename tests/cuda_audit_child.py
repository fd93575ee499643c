# Copyright (c) mmcbn contributors. All rights reserved.
"""The CUDA audit's process: CBN and SyncCBN training steps on fake CUDA.

Run by ``tests/test_cuda_audit.py``::

    python tests/cuda_audit_child.py SHIM.so OUT.json [NAME ...]

It loads the shim (``fake_cuda_shim.cpp``) *before* ``import torch`` (the
CUDA hooks must be registered before torch first asks for them), then runs
each named scenario (all by default) and writes one result per scenario:

- every training step (forward, loss, backward; burn-in and after) runs
  under :class:`fake_cuda.CudaAudit`, on a model whose parameters, buffers
  and inputs are on fake CUDA: its findings per category;
- the CUDA branch must have run: each window normalization calls
  ``batch_norm_stats``, ``batch_norm_backward_reduce`` and
  ``batch_norm_backward_elemt`` once (``kernel_count``);
- the window state after the steps is on the device and float32 (the
  stored ``d nu / d W`` in ``store_dtype`` where set), as are the running
  statistics (``state``);
- the same model on plain CPU tensors (mmcbn's CPU branch) gives the same
  losses, outputs and parameter gradients at every step, and the same
  running statistics (``mismatch``): the CUDA branch computes what the CPU
  branch computes.

A *mutant* runs a scenario with a fault injected into mmcbn's code (its
source, recompiled under mmcbn's file name) to show that the audit sees it.
This module's top level imports nothing but the standard library, so the
test can read the tables without loading torch twice.
"""
import ctypes
import importlib.util
import json
import os.path as osp
import sys

#: Scenarios: the layers ('cbn' or 'sync', a fake world of 2), their
#: arguments, the steps run, the batch size, the autocast dtype.
_W4 = dict(window=4, burnin=2)
SCENARIOS = {
    'cbn_w4':
    dict(kw=_W4, monitor=True),
    'cbn_w4_authors_rule':
    dict(kw=dict(_W4, window_grad=False)),
    'cbn_w4_bf16_store_stride2':
    dict(kw=dict(_W4, store_dtype='bfloat16', moment_stride=2)),
    'cbn_w4_naive':
    dict(kw=dict(_W4, compensate=False)),
    'cbn_w4_amp_fp16':
    dict(kw=_W4, amp='float16'),
    'cbn_w4_amp_bf16':
    dict(kw=dict(_W4, store_dtype='bfloat16'), amp='bfloat16'),
    'cbn_w4_amp_fp16_authors_rule':
    dict(kw=dict(_W4, window_grad=False), amp='float16'),
    'sync_w4':
    dict(layer='sync', kw=_W4, monitor=True),
    'sync_w4_amp_fp16':
    dict(layer='sync', kw=_W4, amp='float16'),
    # one image per rank: the layer after the pooled features sees one
    # value per channel (an image-pool branch), a constant channel
    'sync_w4_one_image':
    dict(layer='sync', kw=_W4, batch=1),
    # float64: the CUDA and CPU branches agree to ~1e-12
    'cbn_w4_float64':
    dict(kw=_W4, dtype='float64'),
    'sync_w4_one_image_float64':
    dict(layer='sync', kw=_W4, batch=1, dtype='float64'),
    # a bfloat16 model (parameters too, no autocast): CUDA only, the CPU
    # branch cannot run it (test_cuda_audit.py, the xfail)
    'sync_w4_bf16_model':
    dict(layer='sync', kw=_W4, dtype='bfloat16', reference=False),
    # channels_last activations (the CUDA kernels' other layout)
    'cbn_w4_channels_last':
    dict(kw=_W4, channels_last=True),
    # the upstream compensation (tests/test_gpu_model.py's UpstreamNet),
    # both forms, with SyncCBN and under autocast
    'cbn_w4_upstream':
    dict(kw=dict(_W4, compensate='upstream', upstream_form='exact')),
    'cbn_w4_upstream_fast':
    dict(kw=dict(_W4, compensate='upstream', upstream_form='fast'),
         monitor=True),
    'sync_w4_upstream_fast':
    dict(layer='sync', kw=dict(_W4, compensate='upstream',
                               upstream_form='fast')),
    'cbn_w4_upstream_fast_amp_bf16':
    dict(kw=dict(_W4, compensate='upstream', upstream_form='fast'),
         amp='bfloat16'),
    # the hook's way: iterations given, gradient accumulation over 2
    # micro-batches (entries of the same cycle used exactly), running
    # statistics from the window, cumulative average
    'cbn_w4_hook_accumulation':
    dict(
        kw=dict(_W4, running_stats_from='window', momentum=None),
        hook=True,
        accumulate=2,
        steps=6),
}
_DEFAULTS = dict(
    layer='cbn',
    steps=5,
    batch=2,
    amp=None,
    monitor=False,
    dtype='float32',
    channels_last=False,
    hook=False,
    accumulate=1,
    reference=True)

#: Injected faults: the scenario, the mutation (module, function, text,
#: replacement) or a named patch, and the findings the audit must report.
MUTANTS = {
    'cpu_tensor':
    dict(
        base='cbn_w4',
        edit=('functional', 'window_moments', 'keep = count > 0',
              'keep = (count > 0) & torch.ones(count.shape[0], '
              'dtype=torch.bool)'),
        expect=('cpu_tensor', 'device_mixing')),
    'python_data_to_device':
    dict(
        base='cbn_w4',
        edit=('functional', 'window_moments', 'k = keep.sum(dtype=mean.dtype)',
              'k = keep.sum(dtype=mean.dtype) * torch.tensor(1.0).to('
              'mean.device)'),
        expect=('cpu_tensor', 'host_copy', 'sync')),  # (lift_fresh)
    'python_data_on_device':
    dict(
        base='cbn_w4',
        edit=('functional', 'window_moments', 'k = keep.sum(dtype=mean.dtype)',
              'k = keep.sum(dtype=mean.dtype) * torch.tensor(1.0, '
              'device=mean.device)'),
        expect=('error', )),
    'bool':
    dict(
        base='cbn_w4',
        edit=('functional', 'window_moments', 'keep = count > 0',
              'keep = count > 0 if bool((count >= 0).all()) else count > 1'),
        expect=('sync', )),
    'item':
    dict(
        base='sync_w4',
        edit=('functional', 'window_moments', 'k = keep.sum(dtype=mean.dtype)',
              'k = keep.sum(dtype=mean.dtype) + 0 * keep.sum().item()'),
        expect=('sync', )),
    'cpu_copy':
    dict(
        base='cbn_w4',
        edit=('functional', 'window_moments', 'k = keep.sum(dtype=mean.dtype)',
              'k = keep.sum(dtype=mean.dtype); k.cpu()'),
        expect=('host_copy', )),
    'cpu_branch_statistics':
    dict(
        base='cbn_w4',
        edit=('functional', 'batch_stats', 'if x.is_cuda:', 'if False:'),
        expect=('cpu_branch', 'kernel_count')),
    'cpu_branch_input_grad':
    dict(
        base='cbn_w4',
        edit=('functional', '_input_grad', 'if x.is_cuda:', 'if False:'),
        expect=('kernel_count', )),
    'autocast_leak':
    dict(
        base='cbn_w4_amp_fp16',
        patch='autocast_leak',
        # (the window state itself stays float32 even then: a record's
        # statistics are stacked with the batch's float32 ones)
        expect=('half_stats', )),
    'half_window_state':
    dict(
        base='cbn_w4',
        edit=('compensation', 'make_record',
              '        weight = prod.weight.to(dtype)',
              '        weight = prod.weight.to(dtype)\n'
              '        record.up_state = mean.half()'),
        expect=('state', )),
    'bool_in_backward':
    dict(
        base='cbn_w4',
        edit=('functional', '_input_grad', 'if x.is_cuda:',
              'if x.is_cuda and bool((count > 0).all()):'),
        expect=('sync', )),
    'float_counts':
    dict(
        base='cbn_w4',
        edit=('functional', '_input_grad',
              'counts = count.round().to(torch.int32).reshape(1)',
              'counts = count.round().reshape(1)'),
        expect=('kernel_contract', 'error')),
    'cuda_backward_local_count':
    dict(
        base='cbn_w4',
        edit=('functional', '_input_grad',
              'counts = count.round().to(torch.int32).reshape(1)',
              'counts = torch.full_like(count, x.numel() // x.shape[1])'
              '.to(torch.int32).reshape(1)'),
        expect=('mismatch', )),
    'welford_eps_0':
    dict(
        base='sync_w4_one_image', patch='welford_eps_0',
        expect=('mismatch', )),
}

#: Findings besides the audit's own categories (fake_cuda.CATEGORIES).
EXTRA = ('kernel_count', 'state', 'mismatch', 'setup', 'error')


def spec(name):
    """A scenario's settings, defaults filled in."""
    return dict(_DEFAULTS, **SCENARIOS[name])


def preload(shim: str):
    """Load the shim and install fake CUDA, before ``import torch``."""
    if 'torch' in sys.modules:
        raise RuntimeError('the shim must be loaded before torch')
    torch_dir = importlib.util.find_spec('torch').submodule_search_locations[0]
    for lib in ('libc10.so', 'libtorch_cpu.so'):
        ctypes.CDLL(osp.join(torch_dir, 'lib', lib), mode=ctypes.RTLD_GLOBAL)
    handle = ctypes.CDLL(shim, mode=ctypes.RTLD_GLOBAL)
    if handle.fake_cuda_install() != 1:
        raise RuntimeError('a CUDA device guard exists: not a CPU-only torch')
    return handle


def main(argv):
    shim, out_path, *names = argv
    handle = preload(shim)
    import torch
    if not handle.fake_cuda_active():
        raise RuntimeError('torch did not take the fake CUDA hooks')
    # factories with device='cuda' first initialize CUDA from Python: the
    # fake device needs nothing
    torch.cuda._lazy_init = lambda: None
    torch.set_num_threads(1)
    import cuda_audit_steps
    names = names or list(SCENARIOS) + list(MUTANTS)
    results = {name: cuda_audit_steps.run(name) for name in names}
    with open(out_path, 'w') as f:
        json.dump(results, f, indent=1)


if __name__ == '__main__':
    main(sys.argv[1:])
