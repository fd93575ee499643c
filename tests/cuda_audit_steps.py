# Copyright (c) mmcbn contributors. All rights reserved.
"""The scenarios of the CUDA audit (tables in ``cuda_audit_child.py``):
training steps on fake CUDA beside the same steps on the CPU.

Imported only in the audit's process, after the shim is installed.
"""
import contextlib
import copy
import inspect
import sys

import torch
import torch.distributed as dist

import mmcbn
import mmcbn.functional as functional
from cuda_audit_child import EXTRA, MUTANTS, spec
from fake_cuda import (CATEGORIES, CudaAudit, FakeCudaTensor, model_to_fake,
                       to_fake, unwrap)
from mmcbn import CBN1d, CBN2d, SyncCBN1d, SyncCBN2d
from test_gpu_model import Net, UpstreamNet  # the GPU-model tests' nets

#: Largest difference allowed between the CUDA and the CPU branch,
#: relative to the largest value of the tensor compared.
#: float32 steps differ by up to ~4e-4 (SyncCBN with one image per rank
#: normalizes by a tiny window variance), float64 ones by ~1e-12: a wrong
#: CUDA branch differs by 1e-1 and more.
TOLERANCE = {
    'float32': 1e-3,
    'float64': 1e-9,
    'float16': 1e-2,
    'bfloat16': 1e-2
}
LR = 0.05


def build(s):
    torch.manual_seed(0)
    norm, norm1d = (CBN2d, CBN1d) if s['layer'] == 'cbn' else (SyncCBN2d,
                                                               SyncCBN1d)
    kw = s['kw']
    net = UpstreamNet if _upstream(s) else Net
    net = net(lambda c: norm(c, **kw), lambda c: norm1d(c, **kw))
    net = net.to(getattr(torch, s['dtype']))
    if s['channels_last']:
        net = net.to(memory_format=torch.channels_last)
    if s['accumulate'] > 1:
        mmcbn.set_cbn_accumulation(net, s['accumulate'])
    return net


# ------------------------------------------------------------ environment
@contextlib.contextmanager
def patched(obj, **attrs):
    old = {name: getattr(obj, name) for name in attrs}
    for name, value in attrs.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(obj, name, value)


def fake_world_of_two():
    """``torch.distributed`` as 2 processes with the same data: an
    all-reduce doubles (on the device, as NCCL would)."""

    def all_reduce(tensor, op=None, group=None, async_op=False):
        tensor.mul_(2)

    return patched(
        dist,
        is_available=lambda: True,
        is_initialized=lambda: True,
        get_world_size=lambda group=None: 2,
        all_reduce=all_reduce)


def cuda_autocast_allowed():
    """``torch.autocast('cuda')`` switches itself off without a CUDA
    runtime; the fake device has one as far as autocast needs."""
    return _stack(
        patched(
            torch.cuda.amp.common, amp_definitely_not_available=lambda: False),
        patched(torch.cuda, is_bf16_supported=lambda *a, **k: True))


def _stack(*managers):
    stack = contextlib.ExitStack()
    for m in managers:
        stack.enter_context(m)
    return stack


# ------------------------------------------------------------- mutations
def mutate(module_name, func_name, old, new):
    """Replace ``old`` by ``new`` in the source of an mmcbn function and
    recompile it under its own file name and line numbers (so the
    mutated code is mmcbn's code); every module that holds the function
    gets the mutant. Returns a context manager that undoes it."""
    module = sys.modules[f'mmcbn.{module_name}']
    original = getattr(module, func_name)
    lines, start = inspect.getsourcelines(original)
    source = ''.join(lines)
    assert source.count(old) == 1, (func_name, old)
    code = compile('\n' * (start - 1) + source.replace(old, new),
                   module.__file__, 'exec')
    namespace = dict(vars(module))
    exec(code, namespace)
    mutant = namespace[func_name]
    holders = [
        m for name, m in list(sys.modules.items())
        if name.startswith('mmcbn') and getattr(m, func_name, None) is original
    ]
    stack = contextlib.ExitStack()
    for m in holders:
        stack.enter_context(patched(m, **{func_name: mutant}))
    return stack


def named_patch(name):
    if name == 'autocast_leak':
        # mmcbn's "autocast off" does nothing: its statistics run under
        # the caller's autocast
        real = torch.autocast

        def autocast(device_type, dtype=None, enabled=True, **kw):
            if not enabled:
                return contextlib.nullcontext()
            return real(device_type, dtype=dtype, enabled=enabled, **kw)

        return patched(torch, autocast=autocast)
    if name == 'welford_eps_0':
        return patched(functional, _WELFORD_EPS=0.0)
    raise KeyError(name)


# -------------------------------------------------------------- the steps
def step(model, x, amp, device_type, zero_grad=True):
    """Forward, loss and backward of one training iteration."""
    if zero_grad:
        for p in model.parameters():
            p.grad = None
    ctx = torch.autocast(device_type, dtype=getattr(torch, amp)) if amp \
        else contextlib.nullcontext()
    with ctx:
        raw = model(x)
    out = raw.to(x.dtype)
    loss = (out**2).mean() + out.mean()
    loss.backward()
    return loss, out, raw


@torch.no_grad()
def sgd(model):
    for p in model.parameters():
        if p.grad is not None:
            p.sub_(p.grad * LR)


def cbn_layers(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, mmcbn.cbn._CrossIterationBatchNorm)]


def window_steps(s, it):
    """Whether the layers normalize with a window at iteration ``it``
    (after burn-in; SyncCBN always combines over the processes)."""
    return s['layer'] == 'sync' or it >= s['kw'].get('burnin', 0)


def check_state(model, s):
    """The window state and running statistics on the device; the window
    state in float32 (float64 in a float64 model; the stored ``d nu / d W``
    in ``store_dtype`` where set), the running statistics in the model's
    dtype."""
    problems = []
    store = s['kw'].get('store_dtype')
    model_dtype = getattr(torch, s['dtype'])
    stats = torch.float64 if model_dtype == torch.float64 else \
        torch.float32
    for name, layer in cbn_layers(model):
        tensors = {
            'running_mean': layer.running_mean,
            'running_var': layer.running_var,
            'flags': layer._flags
        }
        for pos, window in enumerate(layer._windows):
            for key, buf in window._buffers.items():
                tensors[f'window[{pos}].{key}'] = buf
        for key, t in tensors.items():
            if t is None:
                continue
            if not isinstance(t, FakeCudaTensor):
                problems.append(f'{name}.{key} is on {t.device}')
            if t.is_floating_point():
                want = getattr(torch, store) if store and key.endswith(
                    '.var_grad') else model_dtype if key.startswith(
                        'running') else stats
                if t.dtype != want:
                    problems.append(f'{name}.{key} is {t.dtype}, not {want}')
        if not layer._windows or not layer._windows[0]._buffers:
            problems.append(f'{name} stored no window')
    return problems


def _upstream(s):
    return s['kw'].get('compensate') == 'upstream'


def check_setup(model, s):
    """The steps were CBN steps: every layer found its producer (the
    frozen conv's is 'frozen') and holds a full window; with the upstream
    compensation, n2 and n3 followed their feeding norms."""
    problems = []
    for name, layer in cbn_layers(model):
        want = 'frozen' if name == 'n3' and not _upstream(s) else 'bound'
        followed = layer.bindings[0].upstream_followed if \
            _upstream(s) and layer.bindings and layer.bindings[0] else 0
        if _upstream(s) and name in ('n2', 'n3') and not followed:
            problems.append(f'{name} followed no feeding norm')
        got = layer.bindings[0].status if layer.bindings and \
            layer.bindings[0] is not None else None
        if got != want:
            problems.append(f'{name} is {got}, not {want}')
        entries = len(layer._windows[0]) if layer._windows else 0
        if entries != min(s['steps'], layer.window - 1):
            problems.append(f'{name} holds {entries} entries')
    return problems


def compare(tag, fake, ref, tol, mismatches, scale=None):
    """``fake`` (the CUDA branch) against ``ref`` (the CPU branch): the
    largest difference relative to ``scale`` (default: the largest value
    of ``ref``, at least 1) is at most ``tol``. Returns it."""
    a = unwrap(fake).detach().double()
    b = ref.detach().double()
    if a.shape != b.shape:
        mismatches.append(f'{tag}: shape {tuple(a.shape)} vs '
                          f'{tuple(b.shape)}')
        return float('inf')
    if not torch.isfinite(a).all() and torch.isfinite(b).all():
        mismatches.append(f'{tag}: not finite on CUDA')
        return float('inf')
    if scale is None:
        scale = max(float(b.abs().max()), 1.0)
    err = float((a - b).abs().max().nan_to_num(float('inf'))) / scale
    if err > tol:
        mismatches.append(f'{tag}: relative error {err:.2e} > {tol:.0e} '
                          f'(scale {scale:.1e})')
    return err


def run(name):
    """One scenario or mutant: ``findings`` (category -> messages, the
    first 20) and ``max_error`` (the largest relative difference between
    the CUDA and the CPU branch)."""
    mutant = MUTANTS.get(name)
    s = spec(mutant['base'] if mutant else name)
    stack = contextlib.ExitStack()
    found = {k: [] for k in CATEGORIES + EXTRA}
    errors = [0.0]
    try:
        with stack:
            if mutant and 'edit' in mutant:
                stack.enter_context(mutate(*mutant['edit']))
            if mutant and 'patch' in mutant:
                stack.enter_context(named_patch(mutant['patch']))
            _run_steps(s, found, errors)
    except Exception as err:  # noqa: B902 (reported, then checked)
        message = f'{type(err).__name__}: {err}'.splitlines()[0]
        if "from the 'CUDA' backend" in message:
            message += (' (an operator ran on CUDA outside the audit: '
                        'Python data built on the device?)')
        found['error'].append(message)
    return dict(
        findings={
            k: v[:20]
            for k, v in found.items() if v
        },
        max_error=max(errors))


def _run_steps(s, found, errors):
    model = build(s)
    fake = model_to_fake(copy.deepcopy(model))
    gen = torch.Generator().manual_seed(1)
    dtype = getattr(torch, s['dtype'])
    xs = [
        torch.randn(s['batch'], 3, 8, 8, generator=gen, dtype=dtype)
        for _ in range(s['steps'])
    ]
    if s['channels_last']:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    cycle = s['accumulate']
    tol = TOLERANCE[s['amp'] or s['dtype']]

    def check(*args, **kw):
        errors.append(compare(*args, tol, found['mismatch'], **kw))

    env = _stack(
        cuda_autocast_allowed(),
        fake_world_of_two()
        if s['layer'] == 'sync' else contextlib.nullcontext())
    with env:
        for it, x in enumerate(xs):
            monitor = s['monitor'] and it == len(xs) - 1
            for _, layer in cbn_layers(fake) + cbn_layers(model):
                layer._monitor = monitor
            if s['hook']:
                mmcbn.set_cbn_iteration(model, it)
                mmcbn.set_cbn_iteration(fake, it)
            fresh = it % cycle == 0  # (gradients accumulate over a cycle)
            if s['reference']:
                loss_ref, out_ref, _ = step(model, x, s['amp'], 'cpu', fresh)
            xf = to_fake(x)
            with torch.autograd.set_multithreading_enabled(False), \
                    CudaAudit(autocast=bool(s['amp'])) as audit:
                try:
                    loss, out, raw = step(fake, xf, s['amp'], 'cuda', fresh)
                finally:
                    for k, v in audit.summary().items():
                        found[k] += [f'iteration {it}: {m}' for m in v]
            if s['amp'] and raw.dtype != getattr(torch, s['amp']):
                found['setup'].append(f'iteration {it}: the output is '
                                      f'{raw.dtype}: autocast did not act')
            want = len(cbn_layers(fake)) if window_steps(s, it) else 0
            for kernel in ('batch_norm_stats', 'batch_norm_backward_reduce',
                           'batch_norm_backward_elemt'):
                if audit.kernels[kernel] != want:
                    found['kernel_count'].append(
                        f'iteration {it}: {kernel} ran '
                        f'{audit.kernels[kernel]} times, not {want}')
            if (it + 1) % cycle == 0:
                sgd(fake)
            if not s['reference']:
                continue
            check(f'iteration {it} loss', loss, loss_ref)
            check(f'iteration {it} output', out, out_ref)
            # gradients relative to the largest one (a bias gradient that
            # BatchNorm almost cancels is compared at the scale of the rest)
            grad_scale = max(
                float(p.grad.abs().max()) for p in model.parameters()
                if p.grad is not None)
            for (pname, p), p_ref in zip(fake.named_parameters(),
                                         model.parameters()):
                if p_ref.grad is None:
                    continue
                if p.grad is None:
                    found['mismatch'].append(
                        f'iteration {it} {pname}: no gradient')
                    continue
                check(
                    f'iteration {it} {pname}.grad',
                    p.grad,
                    p_ref.grad,
                    scale=grad_scale)
            if (it + 1) % cycle == 0:
                sgd(model)
    found['state'] += check_state(fake, s)
    found['setup'] += check_setup(fake, s)
    if not s['reference']:
        return
    for (lname, layer), (_, ref) in zip(cbn_layers(fake), cbn_layers(model)):
        check(f'{lname}.running_mean', layer.running_mean, ref.running_mean)
        check(f'{lname}.running_var', layer.running_var, ref.running_var)
