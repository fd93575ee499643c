# Copyright (c) mmcbn contributors. All rights reserved.
"""Fake CUDA on a CPU-only torch: tensors that claim ``cuda:0``, and an
audit of what a training step does with them.

CI has no GPU, and FakeTensorMode alone cannot run autograd on device
'cuda' on a CPU build. Two parts make a CUDA training step run there:

- ``fake_cuda_shim.cpp`` (compiled here, cached) gives the CPU build a
  no-op CUDA device guard and CUDA hooks, which autograd needs for tensors
  on a CUDA device. It registers no kernel. It must be loaded before
  ``import torch``, so the audit runs in a fresh process
  (``cuda_audit_child.py``).
- :class:`FakeCudaTensor`, a wrapper subclass whose ``device`` is
  ``cuda:0`` (``is_cuda`` is True) and that holds a real CPU tensor, and
  :class:`CudaAudit`, a ``TorchDispatchMode`` that runs every operator on
  the CPU values and records what would be wrong on a GPU. CUDA-only
  kernels (``batch_norm_stats``, ``batch_norm_backward_reduce``,
  ``batch_norm_backward_elemt``, ...) are computed by emulations that
  enforce the CUDA kernels' contracts: the dtypes their accessors demand,
  float accumulation for half inputs, ``invstd = 0`` where the variance
  and ``eps`` are both 0, int32 counts.

What the audit records (:data:`CATEGORIES`): device mixing, host<->device
copies, CPU tensors created inside mmcbn, operators that synchronize,
half-precision casts of statistics inside mmcbn, the CPU-only branch of
mmcbn taken on "CUDA", and CUDA kernel contract violations. It cannot see
what only a GPU has: launch configurations, streams and their order, the
numerics of the real kernels (the emulations compute in float on the CPU),
cuDNN, memory.
"""
import os
import os.path as osp
import sys
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import mmcbn
from sync_counter import _COPIES, SYNC_OPS, _bool_index, restore_methods

aten = torch.ops.aten
CUDA = torch.device('cuda', 0)
CPU = torch.device('cpu')

SHIM_SOURCE = osp.join(
    osp.dirname(osp.abspath(__file__)), 'fake_cuda_shim.cpp')

#: What the audit reports, one list of messages per category.
CATEGORIES = (
    'device_mixing',  # an op with CUDA tensors and a CPU tensor (not 0-dim)
    'host_copy',  # a copy between the host and the device
    'cpu_tensor',  # a CPU tensor created while mmcbn code runs
    'sync',  # an operator that waits for the device
    'half_stats',  # autocast casts float32 to fp16/bf16 inside mmcbn
    'cpu_branch',  # mmcbn's CPU-only kernels called on "CUDA" tensors
    'kernel_contract',  # a CUDA kernel called against its contract
)


# ----------------------------------------------------------------- the shim
def build_shim(verbose: bool = False) -> str:
    """Compile ``fake_cuda_shim.cpp`` (cached; a first build takes tens of
    seconds) and return the path of the shared library.

    The library is also loaded into this process (the extension loader
    does that); nothing in it runs until ``fake_cuda_install`` is called.
    """
    from torch.utils.cpp_extension import load
    tag = ''.join(c if c.isalnum() else '_' for c in torch.__version__)
    name = f'mmcbn_fake_cuda_{tag}'
    root = os.environ.get('TORCH_EXTENSIONS_DIR') or osp.join(
        osp.expanduser('~'), '.cache', 'torch_extensions')
    build_dir = osp.join(root, 'mmcbn', name)
    os.makedirs(build_dir, exist_ok=True)
    load(
        name,
        sources=[SHIM_SOURCE],
        extra_cflags=['-O1'],
        build_directory=build_dir,
        is_python_module=False,
        verbose=verbose)
    return osp.join(build_dir, name + '.so')


# ------------------------------------------------------------ the tensors
class FakeCudaTensor(torch.Tensor):
    """A tensor on ``cuda:0`` whose values live in a CPU tensor ``elem``."""

    elem: torch.Tensor
    __slots__ = ['elem']

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool = False):
        assert type(elem) is torch.Tensor and elem.device.type == 'cpu'
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=CUDA,
            requires_grad=requires_grad)
        r.elem = elem
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):
        return f'FakeCudaTensor({self.elem!r})'

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # outside an audit (setup, the optimizer step): run, record nothing
        return _run(func, args, kwargs or {}, None)


def to_fake(t):
    """A CPU tensor's copy on fake CUDA (set up outside an audit)."""
    return FakeCudaTensor(t.detach().clone(), requires_grad=t.requires_grad)


def unwrap(t):
    """The CPU values of a fake CUDA tensor (no operator runs)."""
    return t.elem if isinstance(t, FakeCudaTensor) else t


def model_to_fake(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter and buffer of ``model`` to fake CUDA, in
    place (``Module.to('cuda')`` would ask the CUDA runtime)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(
                    FakeCudaTensor(p.detach().clone()), p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = FakeCudaTensor(b.detach().clone())
    return model


# ------------------------------------------------------- CUDA-only kernels
class ContractError(RuntimeError):
    """A CUDA kernel called against its contract (it would raise)."""


def _acc(dtype):
    """``at::acc_type<scalar_t, /*is_cuda=*/true>``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _require(cond, message):
    if not cond:
        raise ContractError(message)


def _channel(v, x):
    return v.view((1, -1) + (1, ) * (x.dim() - 2))


def _dims(x):
    return (0, ) + tuple(range(2, x.dim()))


def _floating(x, name):
    _require(
        x.dtype
        in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
        f'{name}: not implemented for {x.dtype}')


def _batch_norm_stats(x, eps):
    """CUDA's Welford kernel: mean and ``invstd = (var + eps)^-1/2`` in
    the accumulation type, ``invstd = 0`` where ``var == 0 and eps == 0``
    (``InvStd`` in Normalization.cuh)."""
    _floating(x, 'batch_norm_stats')
    _require(x.dim() >= 2 and x.shape[1] > 0,
             'batch_norm_stats: needs an (N, C, ...) input')
    acc = _acc(x.dtype)
    xs = x.to(acc)
    mean = xs.mean(_dims(x))
    var = xs.var(_dims(x), unbiased=False)
    invstd = torch.where((var == 0) & (eps == 0), torch.zeros_like(var),
                         (var + eps).rsqrt())
    return mean, invstd


def _stat_type(x, weight, name):
    """The dtype CUDA's accessors demand of mean/invstd/sums, and of the
    weight (``is_mixed_type``: a weight of another dtype than the input
    must be the accumulation type)."""
    acc = _acc(x.dtype)
    if weight is not None and weight.dtype != x.dtype:
        _require(weight.dtype == acc,
                 f'{name}: weight is {weight.dtype}, input {x.dtype}')
    return acc


def _batch_norm_backward_reduce(grad_out, x, mean, invstd, weight, input_g,
                                weight_g, bias_g):
    name = 'batch_norm_backward_reduce'
    _floating(x, name)
    _require(grad_out.dtype == x.dtype,
             f'{name}: grad_output {grad_out.dtype} vs input {x.dtype}')
    _require(grad_out.shape == x.shape, f'{name}: shapes differ')
    _require(mean.dtype == invstd.dtype,
             f'{name}: mean and invstd need to have the same data types')
    acc = _stat_type(x, weight, name)
    _require(mean.dtype == acc,
             f'{name}: mean/invstd are {mean.dtype}, the kernel reads {acc}')
    _require((weight_g or bias_g) <= (weight is not None),
             f'{name}: a weight gradient without a weight')
    g = grad_out.to(acc)
    xmu = x.to(acc) - _channel(mean, x)
    sum_dy = g.sum(_dims(x))
    sum_dy_xmu = (g * xmu).sum(_dims(x))
    grad_w = (sum_dy_xmu * invstd).to(weight.dtype) if weight_g else None
    grad_b = sum_dy.to(weight.dtype) if bias_g else None
    if not input_g:
        sum_dy = sum_dy_xmu = None
    return sum_dy, sum_dy_xmu, grad_w, grad_b


def _batch_norm_backward_elemt(grad_out, x, mean, invstd, weight, sum_dy,
                               sum_dy_xmu, count):
    name = 'batch_norm_backward_elemt'
    _floating(x, name)
    _require(grad_out.dtype == x.dtype,
             f'{name}: grad_output {grad_out.dtype} vs input {x.dtype}')
    _require(mean.dtype == invstd.dtype,
             f'{name}: mean and invstd need to have the same data types')
    acc = _acc(x.dtype)
    for t, what in ((mean, 'mean'), (sum_dy, 'sum_dy'), (sum_dy_xmu,
                                                         'sum_dy_xmu')):
        _require(t.dtype == acc,
                 f'{name}: {what} is {t.dtype}, the kernel reads {acc}')
    if weight is not None:
        _require(
            weight.dtype in (x.dtype, acc),
            f'{name}: weight is {weight.dtype}, input {x.dtype}')
        if x.dtype != acc:  # (half input with float stats: float weight)
            _require(weight.dtype == acc,
                     f'{name}: weight is {weight.dtype}, stats {acc}')
    _require(count.dtype == torch.int32,
             f'{name}: count is {count.dtype}, the kernel reads int32')
    norm = 1.0 / count.to(torch.int64).sum().to(acc)
    gamma = invstd if weight is None else weight.to(acc) * invstd
    g = grad_out.to(acc)
    xmu = x.to(acc) - _channel(mean, x)
    grad = (g - _channel(sum_dy * norm, x) -
            xmu * _channel(invstd * invstd * sum_dy_xmu * norm, x)) * _channel(
                gamma, x)
    return grad.to(x.dtype)


def _batch_norm_elemt(x, weight, bias, mean, invstd, eps):
    name = 'batch_norm_elemt'
    _floating(x, name)
    acc = _acc(x.dtype)
    _require(mean.dtype == invstd.dtype == acc,
             f'{name}: mean/invstd are {mean.dtype}, the kernel reads {acc}')
    y = (x.to(acc) - _channel(mean, x)) * _channel(invstd, x)
    if weight is not None:
        y = y * _channel(weight.to(acc), x)
    if bias is not None:
        y = y + _channel(bias.to(acc), x)
    return y.to(x.dtype)


def _native_batch_norm(x, weight, bias, mean, var, training, momentum, eps):
    """``native_batch_norm`` on the CPU kernel, with CUDA's dtype rules:
    CUDA reads a half-precision weight and bias next to float statistics
    (``is_mixed_type`` looks at the weight only), the CPU kernel wants all
    parameters float then: they are promoted, as CUDA's accessors read
    them in float."""
    if x.dtype in _HALF and weight is not None and weight.dtype == x.dtype \
            and mean is not None and mean.dtype == torch.float32:
        weight = weight.float()
        bias = None if bias is None else bias.float()
    return aten.native_batch_norm.default(x, weight, bias, mean, var, training,
                                          momentum, eps)


#: CUDA-only operators and their emulations (CPU values in, CPU values out).
CUDA_KERNELS = {
    aten.batch_norm_stats.default: _batch_norm_stats,
    aten.batch_norm_backward_reduce.default: _batch_norm_backward_reduce,
    aten.batch_norm_backward_elemt.default: _batch_norm_backward_elemt,
    aten.batch_norm_elemt.default: _batch_norm_elemt,
}

#: The kernels of mmcbn's CPU branches: on CUDA tensors mmcbn must take the
#: CUDA branch instead (counted where mmcbn's own code calls them).
CPU_BRANCH_OPS = {
    aten.batch_norm_update_stats.default,
    aten.native_batch_norm_backward.default,
}

_HALF = (torch.float16, torch.bfloat16)
#: ``torch.tensor(data)``: the CPU tensor made from Python data.
_LIFTS = (aten.lift_fresh.default, aten.lift_fresh_copy.default)


# ------------------------------------------------------------ the dispatch
def _device_of(kwargs):
    device = kwargs.get('device')
    return None if device is None else torch.device(device)


def _is_cuda(device):
    return device is not None and device.type == 'cuda'


_write_alias_cache = {}


def _write_aliases(func):
    """For each return of ``func``: the (position, name) of the argument it
    writes into and returns (in-place and out= ops), else None."""
    found = _write_alias_cache.get(func)
    if found is None:
        schema = func._schema
        found = []
        for ret in schema.returns:
            info = ret.alias_info
            match = None
            if info is not None and info.is_write:
                for pos, arg in enumerate(schema.arguments):
                    a = arg.alias_info
                    if a is not None and a.is_write and \
                            a.before_set & info.before_set:
                        match = (pos, arg.name, arg.kwarg_only)
                        break
            found.append(match)
        found = _write_alias_cache[func] = tuple(found)
    return found


def _run(func, args, kwargs, audit):
    """Run ``func`` on the CPU values; wrap what a CUDA op would return on
    CUDA; let ``audit`` (a :class:`CudaAudit`, or None) see it first."""
    flat, _ = tree_flatten((args, kwargs))
    fakes = [t for t in flat if isinstance(t, FakeCudaTensor)]
    device = _device_of(kwargs)
    on_cuda = _is_cuda(device) or (device is None and bool(fakes))
    if audit is not None:
        audit.inspect(func, args, kwargs, flat, fakes, device)
    cpu_args, cpu_kwargs = tree_map(unwrap, (args, kwargs))
    if _is_cuda(device):
        cpu_kwargs['device'] = CPU
    emulation = CUDA_KERNELS.get(func)
    if emulation is not None and fakes:
        if audit is not None:
            audit.kernels[str(func.overloadpacket.__name__)] += 1
        try:
            out = emulation(*cpu_args, **cpu_kwargs)
        except ContractError as err:
            if audit is not None:
                audit.report('kernel_contract', str(err))
            raise
    elif func is aten.native_batch_norm.default and fakes:
        out = _native_batch_norm(*cpu_args, **cpu_kwargs)
    else:
        out = func(*cpu_args, **cpu_kwargs)
    if not on_cuda:
        wrapped = out
    else:
        wrapped = tree_map(
            lambda t: FakeCudaTensor(t) if type(t) is torch.Tensor else t, out)
    # in-place and out= ops return the tensor they wrote into
    aliases = _write_aliases(func)
    if any(a is not None for a in aliases):
        results = list(wrapped) if isinstance(wrapped, (tuple, list)) \
            else [wrapped]
        for i, alias in enumerate(aliases):
            if alias is None:
                continue
            pos, name, kw_only = alias
            target = kwargs.get(name) if (kw_only or pos >= len(args)) \
                else args[pos]
            if target is not None:
                results[i] = target
        wrapped = tuple(results) if isinstance(wrapped, (tuple, list)) \
            else results[0]
    if torch.Tag.inplace_view in func.tags and fakes:
        _update_wrapper_metadata(func, args, kwargs)
    if audit is not None:
        audit.inspect_outputs(func, flat, fakes, wrapped)
    return wrapped


def _update_wrapper_metadata(func, args, kwargs):
    """An in-place view op (``squeeze_``, ``t_``, ``as_strided_``, ...)
    changed the shape of the CPU values: change the wrapper's the same way
    (its meta kernel, as ``return_and_correct_aliasing`` does)."""
    with torch.utils._mode_utils.no_dispatch():
        meta_in_tls = torch._C._meta_in_tls_dispatch_include()
        torch._C._set_meta_in_tls_dispatch_include(True)
        try:
            func(*args, **kwargs)
        finally:
            torch._C._set_meta_in_tls_dispatch_include(meta_in_tls)


_TORCH_DIR = osp.dirname(torch.__file__) + os.sep
_MMCBN_DIR = osp.dirname(osp.abspath(mmcbn.__file__)) + os.sep
_THIS_FILE = osp.abspath(__file__)
if _THIS_FILE.endswith('.pyc'):
    _THIS_FILE = _THIS_FILE[:-1]


def _where(frame):
    code = frame.f_code
    return (f'{osp.relpath(code.co_filename, osp.dirname(_MMCBN_DIR))}:'
            f'{frame.f_lineno} ({code.co_name})')


def _caller():
    """The innermost frame outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(_TORCH_DIR) or name == _THIS_FILE
                or name.startswith('<')):
            return frame
        frame = frame.f_back
    return None


def _mmcbn_frame(frame):
    """The innermost mmcbn frame at or outside ``frame`` (None if mmcbn
    code is not running)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith(_MMCBN_DIR):
            return frame
        frame = frame.f_back
    return None


class CudaAudit(TorchDispatchMode):
    """Run operators on fake CUDA tensors and record what a GPU would not
    allow or would wait for (see :data:`CATEGORIES`).

    While active it also makes the host reads that no operator shows
    (``Tensor.tolist``/``numpy``/``__array__``/``__repr__`` of a fake CUDA
    tensor: printing a CUDA tensor waits for it) count as ``sync``.

    Args:
        autocast (bool): The step runs under autocast: a float32 -> half
            cast inside mmcbn is then autocast reaching its statistics
            (the autocast state itself is not visible below the autocast
            kernels).

    Attributes:
        found (dict): category -> list of messages ('op at file:line').
        kernels (Counter): calls of the emulated CUDA kernels.
    """

    def __init__(self, autocast: bool = False):
        super().__init__()
        self.autocast = autocast
        self.found = defaultdict(list)
        self.kernels = Counter()
        self._patched = {}

    def report(self, category, message):
        assert category in CATEGORIES, category
        self.found[category].append(message)

    @property
    def clean(self) -> bool:
        return not any(self.found.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {}, self)

    def _here(self):
        frame = _caller()
        return 'at ' + _where(frame) if frame is not None else ''

    def inspect(self, func, args, kwargs, flat, fakes, device):
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        plain = [t for t in tensors if not isinstance(t, FakeCudaTensor)]
        name = str(func)
        if func in SYNC_OPS or _bool_index(func, args):
            self.report('sync', f'{name} {self._here()}')
        if func is aten._to_copy.default and fakes and \
                kwargs.get('dtype') in _HALF and \
                args[0].dtype not in _HALF and self.autocast:
            frame = _caller()
            if frame is not None and \
                    frame.f_code.co_filename.startswith(_MMCBN_DIR):
                self.report(
                    'half_stats', f'{name} {args[0].dtype} -> '
                    f'{kwargs["dtype"]} at {_where(frame)}')
        if func in _COPIES:
            dst, src = _COPIES[func]
            source = args[src] if len(args) > src else None
            if isinstance(source, torch.Tensor):
                src_cuda = isinstance(source, FakeCudaTensor)
                if dst is None:
                    dst_cuda = src_cuda if device is None else \
                        _is_cuda(device)
                else:
                    dst_cuda = isinstance(args[dst], FakeCudaTensor)
                if src_cuda != dst_cuda:
                    direction = 'device -> host' if src_cuda else \
                        'host -> device'
                    self.report('host_copy',
                                f'{name} {direction} {self._here()}')
            return
        if fakes and any(t.dim() > 0 for t in plain):
            shapes = [tuple(t.shape) for t in plain if t.dim() > 0]
            self.report('device_mixing',
                        f'{name} with CPU tensors {shapes} {self._here()}')
        if fakes and func in CPU_BRANCH_OPS:
            frame = _caller()
            if frame is not None and \
                    frame.f_code.co_filename.startswith(_MMCBN_DIR):
                self.report('cpu_branch', f'{name} at {_where(frame)}')

    def inspect_outputs(self, func, flat, fakes, out):
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not any(type(t) is torch.Tensor for t in outs):
            return
        if func not in _LIFTS and any(t is o for o in outs for t in flat):
            return  # wrote into a CPU input, created earlier
        frame = _mmcbn_frame(_caller())
        if frame is not None:
            self.report('cpu_tensor',
                        f'{func} made a CPU tensor at {_where(frame)}')

    # ------------------------------------------- host reads (no operator)
    def __enter__(self):
        for name in ('tolist', 'numpy', '__array__', '__repr__'):
            self._patch(name)
        return super().__enter__()

    def _patch(self, name):
        audit = self
        own = FakeCudaTensor.__dict__.get(name)
        method = getattr(torch.Tensor, name)

        def host_read(tensor, *args, **kwargs):
            audit.report('sync', f'Tensor.{name} {audit._here()}')
            if isinstance(tensor, FakeCudaTensor):
                return method(tensor.elem, *args, **kwargs)
            return method(tensor, *args, **kwargs)

        self._patched[name] = own
        setattr(FakeCudaTensor, name, host_read)

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            restore_methods(FakeCudaTensor, self._patched)
            self._patched = {}

    def summary(self) -> dict:
        return {k: list(v) for k, v in self.found.items() if v}
