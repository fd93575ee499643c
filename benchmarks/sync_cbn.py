# Copyright (c) mmcbn contributors. All rights reserved.
"""SyncCBN evidence: step time, bytes communicated, statistics error.

Everything runs in 2 gloo processes (one torch thread each) on the CPU,
with the model wrapped in ``DistributedDataParallel`` (gradients averaged)
and each process drawing its own images from a shared stream:

1. **Correctness of the SyncBN baseline.** ``torch.nn.SyncBatchNorm``
   (mmcv's ``SyncBN``) is tried on the CPU; in torch 2.x its forward
   refuses CPU tensors. The baseline is then :class:`CpuSyncBatchNorm2d`,
   torch's algorithm and communication pattern written for the CPU: one
   ``all_gather`` of ``(mean, invstd, count)`` (2C + 1 numbers per
   process, as torch does on gloo) in the forward and one ``all_reduce`` of
   the two per-channel gradient sums (2C) in the backward. A few SGD steps
   check that it trains exactly as ``SyncCBN(window=1)`` (SyncBN through
   mmcbn's all-reduce) does.
2. **Bytes per layer and iteration.** ``torch.distributed.all_reduce`` and
   ``all_gather`` are wrapped in the benchmark processes and every call of
   a training step is recorded (size, forward or backward), for SyncBN and
   SyncCBN with windows 1, 2, 4, 8, and compared with the formulas. DDP's
   gradient all-reduce (C++ reducer) is counted separately through a
   communication hook, for scale.
3. **Step time.** BN, SyncBN, CBN and SyncCBN (windows 1, 4, 8) are
   trained side by side in the same 2 processes, one step of each in turn
   (round-robin), and the median step time (slower of the 2 processes) is
   reported as a ratio to BN from the same run.
4. **What pooling both axes buys.** The same net is trained from the same
   initialization under each norm at per-process batch ``--batch`` (1-2)
   for ``--iters`` iterations on the same image stream. At probe
   iterations (after the CBN burn-in) every norm layer's statistics, the
   mean and variance it normalized with in the training forward, are
   compared with population statistics under the current weights: those
   of a fixed reference set of ``--ref-size`` training images forwarded
   through a BN copy of the network in train mode (every layer normalizing
   with the reference set's own statistics; ``stats_error.true_stats``).
   Errors are relative L2 norms over channels per layer,
   ``||est - pop|| / ||pop||``, averaged over layers, probes and the 2
   processes.

Model: ``common.SmallResNet`` in ResNet-18 layout (BasicBlocks 2-2-2-2,
20 norm layers) on scikit-learn's bundled digits upsampled to 16x16 (see
``common.dataset_note``).

    python benchmarks/sync_cbn.py            # full run (~22 min here)
    python benchmarks/sync_cbn.py --quick    # smoke test (< 2 min)

Writes ``sync_cbn.json`` and ``sync_cbn.png`` into ``--out``.
"""
import multiprocessing
import os
import os.path as osp
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from common import (  # noqa: E402
    benchmark_parser,
    conv_norm_pairs,
    dataset_note,
    evaluate,
    load_digits_split,
    machine_info,
    markdown_table,
    save_png,
    SmallResNet,
    Timer,
    write_json)

from mmcbn import CBN2d, SyncCBN2d  # noqa: E402

WORLD = 2


# ------------------------------------------------------- SyncBN baseline
class _SyncBatchNormGrad(torch.autograd.Function):
    """Normalization with given global statistics; the backward all-reduces
    the two per-channel gradient sums, as ``torch.nn.SyncBatchNorm`` does.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, total, group):
        y = torch.ops.aten.native_batch_norm(x, weight, bias, mean,
                                             invstd.pow(-2), False, 0.0,
                                             0.0)[0]
        ctx.save_for_backward(x, weight, mean, invstd, total)
        ctx.group = group
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, invstd, total = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        shape = (1, -1) + (1, ) * (x.dim() - 2)
        dims = (0, ) + tuple(range(2, x.dim()))
        xmu = x - mean.view(shape)
        sum_dy = grad_y.sum(dims)
        sum_dy_xmu = (grad_y * xmu).sum(dims)
        grad_w = sum_dy_xmu * invstd
        grad_b = sum_dy.clone()
        sums = torch.cat([sum_dy, sum_dy_xmu])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
        channels = x.shape[1]
        mean_dy = (sums[:channels] / total).view(shape)
        mean_dy_xmu = (sums[channels:] / total).view(shape)
        scale = (weight * invstd).view(shape)
        grad_x = scale * (grad_y - mean_dy -
                          xmu * invstd.square().view(shape) * mean_dy_xmu)
        return grad_x, grad_w, grad_b, None, None, None, None


class CpuSyncBatchNorm2d(nn.BatchNorm2d):
    """SyncBN for the CPU: ``torch.nn.SyncBatchNorm``'s algorithm and
    communication (forward: ``all_gather`` of each process's
    ``(mean, invstd, count)``, 2C + 1 numbers; backward: ``all_reduce`` of
    ``(sum dy, sum dy (x - mean))``, 2C numbers). Outside a distributed
    training forward it is ``nn.BatchNorm2d``. ``last_stats`` holds the
    global (mean, biased variance) of the last training forward."""

    def __init__(self, num_features, process_group=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.process_group = process_group
        self.last_stats = None

    def forward(self, x):
        if not (self.training and dist.is_initialized() and
                dist.get_world_size(self.process_group) > 1):
            return super().forward(x)
        channels = x.shape[1]
        world = dist.get_world_size(self.process_group)
        with torch.no_grad():
            var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3),
                                       correction=0)
            invstd = torch.rsqrt(var + self.eps)
            count = mean.new_full((1, ), x.numel() // channels)
            packed = torch.cat([mean, invstd, count])
            gathered = [torch.empty_like(packed) for _ in range(world)]
            dist.all_gather(gathered, packed, group=self.process_group)
            table = torch.stack(gathered)
            means = table[:, :channels]
            variances = table[:, channels:2 * channels].pow(-2) - self.eps
            counts = table[:, 2 * channels:]
            total = counts.sum()
            g_mean = (counts * means).sum(0) / total
            g_var = (counts * (variances + (means - g_mean).square())
                     ).sum(0) / total
            g_invstd = torch.rsqrt(g_var + self.eps)
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(g_mean, self.momentum)
            self.running_var.lerp_(g_var * total / (total - 1),
                                   self.momentum)
        self.last_stats = (g_mean, g_var)
        return _SyncBatchNormGrad.apply(x, self.weight, self.bias, g_mean,
                                        g_invstd, total, self.process_group)


# --------------------------------------------------------------- variants
#: name -> (norm factory key, window); window None for BN/SyncBN.
VARIANTS = {
    'BN': ('bn', None),
    'SyncBN': ('syncbn', None),
    'SyncCBN w1': ('synccbn', 1),
    'SyncCBN w2': ('synccbn', 2),
    'CBN w4': ('cbn', 4),
    'SyncCBN w4': ('synccbn', 4),
    'CBN w8': ('cbn', 8),
    'SyncCBN w8': ('synccbn', 8),
}
BYTES_VARIANTS = ['BN', 'CBN w4', 'SyncBN', 'SyncCBN w1', 'SyncCBN w2',
                  'SyncCBN w4', 'SyncCBN w8']
SPEED_VARIANTS = ['BN', 'SyncBN', 'SyncCBN w1', 'CBN w4', 'SyncCBN w4',
                  'CBN w8', 'SyncCBN w8']
STATS_VARIANTS = ['BN', 'SyncBN', 'CBN w4', 'CBN w8', 'SyncCBN w4']


def norm_factory(name, burnin=0):
    kind, window = VARIANTS[name]
    if kind == 'bn':
        return lambda c: nn.BatchNorm2d(c)
    if kind == 'syncbn':
        return lambda c: CpuSyncBatchNorm2d(c)
    layer = CBN2d if kind == 'cbn' else SyncCBN2d
    return lambda c: layer(c, window=window, burnin=burnin)


def images_per_statistic(name, batch):
    """Samples (images) one normalization pools at steady state."""
    kind, window = VARIANTS[name]
    world = WORLD if kind in ('syncbn', 'synccbn') else 1
    return batch * world * (window or 1)


def build(name, args, burnin=0, dtype=torch.float32):
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(args.seed)  # the same initial weights for every norm
    model = SmallResNet(norm_factory(name, burnin), widths=args.widths,
                        blocks=args.blocks).to(dtype)
    return model, DDP(model, broadcast_buffers=False)


class Stream:
    """Each step's global batch (WORLD x batch images, drawn without
    replacement epoch by epoch); rank r takes its slice."""

    def __init__(self, n_train, batch, seed):
        self.n, self.batch = n_train, batch
        self.gen = torch.Generator().manual_seed(1000 + seed)
        self.order = torch.empty(0, dtype=torch.long)

    def indices(self, step, rank):
        need = (step + 1) * WORLD * self.batch
        while len(self.order) < need:
            self.order = torch.cat(
                [self.order, torch.randperm(self.n, generator=self.gen)])
        start = step * WORLD * self.batch + rank * self.batch
        return self.order[start:start + self.batch]


def sgd(model, lr):
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.SGD([
        dict(params=decay, weight_decay=1e-4),
        dict(params=no_decay, weight_decay=0.)
    ], lr=lr, momentum=0.9)


class Phase:
    """Which part of the step runs (for attributing collective calls)."""
    name = 'other'


def train_step(ddp, opt, x, y):
    Phase.name = 'forward'
    loss = F.cross_entropy(ddp(x), y)
    opt.zero_grad(set_to_none=True)
    Phase.name = 'backward'
    loss.backward()
    Phase.name = 'other'
    opt.step()
    return loss


# ------------------------------------------------- collective call counter
class CollectiveCounter:
    """Wraps ``dist.all_reduce`` and ``dist.all_gather``: records
    ``(op, phase, numel, element_size)`` for every call while active."""

    def __init__(self):
        self.calls = []
        self.active = False
        self.all_reduce = dist.all_reduce
        self.all_gather = dist.all_gather
        counter = self

        def all_reduce(tensor, *a, **k):
            if counter.active:
                counter.calls.append(('all_reduce', Phase.name,
                                      tensor.numel(), tensor.element_size()))
            return counter.all_reduce(tensor, *a, **k)

        def all_gather(tensor_list, tensor, *a, **k):
            if counter.active:
                counter.calls.append(
                    ('all_gather', Phase.name,
                     sum(t.numel() for t in tensor_list),
                     tensor.element_size()))
            return counter.all_gather(tensor_list, tensor, *a, **k)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather


def expected_calls(name, channels):
    """The formula: per norm layer (forward order) the collective calls of
    one training step, as ``(op, phase, numel)``; backward in reverse."""
    kind, window = VARIANTS[name]
    if kind == 'syncbn':
        fwd = [('all_gather', 'forward', WORLD * (2 * c + 1))
               for c in channels]
    elif kind == 'synccbn':
        fwd = [('all_reduce', 'forward', window * (1 + 2 * c))
               for c in channels]
    else:
        return []
    bwd = [('all_reduce', 'backward', 2 * c) for c in reversed(channels)]
    return fwd + bwd


def measure_bytes(rank, args, data, counter):
    x_tr, y_tr = data[0], data[1]
    stream = Stream(len(x_tr), args.batch, args.seed)
    out = {}
    for name in BYTES_VARIANTS:
        model, ddp = build(name, args)
        ddp_bytes = []

        def hook(state, bucket):
            buf = bucket.buffer()
            ddp_bytes.append(buf.numel() * buf.element_size())
            buf.div_(WORLD)
            return counter.all_reduce(buf, async_op=True).get_future().then(
                lambda fut: fut.value()[0])

        ddp.register_comm_hook(None, hook)
        opt = sgd(model, 0.01)
        channels = [p[3].num_features for p in conv_norm_pairs(model)]
        steps = []
        for step in range(3):
            idx = stream.indices(step, rank)
            counter.calls, counter.active = [], True
            del ddp_bytes[:]
            train_step(ddp, opt, x_tr[idx], y_tr[idx])
            counter.active = False
            steps.append(dict(calls=list(counter.calls),
                              ddp_bytes=sum(ddp_bytes)))
        expected = expected_calls(name, channels)
        calls = steps[-1]['calls']
        out[name] = dict(
            channels=channels,
            calls=[list(c) for c in calls],
            same_calls_every_step=all(s['calls'] == calls for s in steps),
            matches_formula=[c[:3] for c in calls] == expected,
            forward_numel=sum(c[2] for c in calls if c[1] == 'forward'),
            backward_numel=sum(c[2] for c in calls if c[1] == 'backward'),
            bytes_per_step=sum(c[2] * c[3] for c in calls),
            expected_numel=sum(c[2] for c in expected),
            ddp_bytes_per_step=steps[-1]['ddp_bytes'],
            parameter_bytes=sum(p.numel() * p.element_size()
                                for p in model.parameters()))
    return out


# ----------------------------------------------------------- correctness
def check_torch_syncbn(rank):
    """Does ``torch.nn.SyncBatchNorm`` (mmcv's SyncBN) train on the CPU?"""
    layer = nn.SyncBatchNorm(4)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    try:
        layer(x).sum().backward()
    except Exception as err:  # noqa: B902 (recorded, not hidden)
        return dict(runs=False, error=f'{type(err).__name__}: {err}')
    return dict(runs=True, error=None)


def check_baseline(rank, args, data):
    """The CPU SyncBN trains exactly as SyncCBN(window=1) does (float64,
    so that a difference is not rounding)."""
    x_tr, y_tr = data[0].double(), data[1]
    stream = Stream(len(x_tr), args.batch, args.seed)
    runs = {}
    for name in ('SyncBN', 'SyncCBN w1'):
        model, ddp = build(name, args, dtype=torch.float64)
        opt = sgd(model, 0.05)
        losses = []
        for step in range(args.check_steps):
            idx = stream.indices(step, rank)
            losses.append(train_step(ddp, opt, x_tr[idx], y_tr[idx]).item())
        runs[name] = (losses, model.state_dict())
    (l_a, s_a), (l_b, s_b) = runs['SyncBN'], runs['SyncCBN w1']
    return dict(
        steps=args.check_steps,
        max_abs_loss_diff=max(abs(a - b) for a, b in zip(l_a, l_b)),
        max_abs_state_diff=max((s_a[k].double() - s_b[k].double()).abs()
                               .max().item() for k in s_a),
        loss_first=l_a[0], loss_last=l_a[-1])


# ----------------------------------------------------------------- speed
def measure_speed(rank, args, data):
    """Wall and CPU time of each variant's training step, round-robin.

    Each step starts at a barrier; the order of the variants rotates from
    one round to the next. The CPU time (``time.process_time``, all
    threads of the process) excludes waiting in a collective (gloo blocks,
    it does not spin), so it is the work a step costs, whatever the
    machine's load; the wall time also holds the waiting.
    """
    x_tr, y_tr = data[0], data[1]
    stream = Stream(len(x_tr), args.batch, args.seed)
    runs = {}
    for name in SPEED_VARIANTS:
        model, ddp = build(name, args)
        runs[name] = (ddp, sgd(model, 0.01))
    wall = {name: [] for name in SPEED_VARIANTS}
    cpu = {name: [] for name in SPEED_VARIANTS}
    warmup = max(w or 1 for _, w in VARIANTS.values()) + 2
    n = len(SPEED_VARIANTS)
    for step in range(warmup + args.reps):
        idx = stream.indices(step, rank)
        x, y = x_tr[idx], y_tr[idx]
        order = SPEED_VARIANTS[step % n:] + SPEED_VARIANTS[:step % n]
        for name in order:
            ddp, opt = runs[name]
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(ddp, opt, x, y)
            if step >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    # one collective between the 2 processes, from a barrier: latency for
    # SyncBN- and SyncCBN-sized payloads (C = 256)
    sizes = [2 * (2 * 256 + 1)] + [k * (1 + 2 * 256) for k in (1, 4, 8)]
    latency = {numel: [] for numel in sizes}
    bufs = {numel: torch.zeros(numel) for numel in sizes}
    for _ in range(args.reps):
        for numel in sizes:
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(bufs[numel])
            latency[numel].append(time.perf_counter() - start)
    return dict(wall=wall, cpu=cpu, all_reduce_s=latency)


# ------------------------------------------------ statistics error study
def rel(est, true):
    return (torch.linalg.vector_norm(est - true) /
            torch.linalg.vector_norm(true).clamp_min(1e-12)).item()


class UsedStats:
    """Captures the (mean, biased variance) each norm layer normalized
    with in a training forward: a CBN/SyncCBN layer's window statistics
    (``mmcbn.cbn.window_norm``'s result, wrapped), the CPU SyncBN's global
    statistics, otherwise (BN, CBN without history) the batch's own."""

    def __init__(self, norms):
        import mmcbn.cbn as cbn_module
        self.module = cbn_module
        self.window_norm = cbn_module.window_norm
        self.current = None
        self.used = {}
        self.active = False

        def window_norm(*a, **k):
            y, stats = self.window_norm(*a, **k)
            self.current = (stats.mean_bar.detach().clone(),
                            stats.var_bar.detach().clone())
            return y, stats

        cbn_module.window_norm = window_norm
        self.handles = []
        for i, norm in enumerate(norms):
            self.handles.append(norm.register_forward_pre_hook(
                self._pre_hook))
            self.handles.append(norm.register_forward_hook(self._hook(i)))

    def _pre_hook(self, module, inputs):
        self.current = None

    def _hook(self, i):

        def hook(module, inputs, output):
            if not self.active:
                return
            if isinstance(module, CpuSyncBatchNorm2d):
                mean, var = module.last_stats
            elif self.current is not None:
                mean, var = self.current
            else:
                var, mean = torch.var_mean(inputs[0].detach(),
                                           dim=(0, 2, 3), correction=0)
            self.used[i] = (mean.float(), var.float())

        return hook

    def remove(self):
        self.module.window_norm = self.window_norm
        for h in self.handles:
            h.remove()


def stats_run(rank, name, args, data, ref_idx):
    from stats_error import true_stats
    x_tr, y_tr, x_te, y_te = data
    burnin = args.burnin if VARIANTS[name][1] else 0
    model, ddp = build(name, args, burnin=burnin)
    twin = SmallResNet(lambda c: nn.BatchNorm2d(c, momentum=0.0),
                       widths=args.widths, blocks=args.blocks)
    pairs = conv_norm_pairs(model)
    norms = [p[3] for p in pairs]
    convs_twin = [p[1] for p in conv_norm_pairs(twin)]
    lr = args.lr if args.lr else 0.1 * WORLD * args.batch / 32
    opt = sgd(model, lr)
    stream = Stream(len(x_tr), args.batch, args.seed)
    probes = set(args.probes)
    capture = UsedStats(norms)
    records, losses = [], []
    timer = Timer()
    model.train()
    for step in range(args.iters):
        idx = stream.indices(step, rank)
        if step in probes:
            with torch.no_grad():
                pop = true_stats(twin, model, convs_twin, x_tr[ref_idx])
            capture.used, capture.active = {}, True
        loss = train_step(ddp, opt, x_tr[idx], y_tr[idx])
        if step in probes:
            capture.active = False
            for li in range(len(norms)):
                mean, var = capture.used[li]
                pop_mean, pop_var = pop[li]
                records.append(dict(
                    t=step, layer=li, mean=rel(mean, pop_mean),
                    var=rel(var, pop_var),
                    used_mean=mean.tolist(), used_var=var.tolist()))
        losses.append(loss.item())
    capture.remove()
    accuracy = evaluate(model, x_te, y_te)
    return dict(name=name, lr=lr, burnin=burnin, records=records,
                loss_first=sum(losses[:20]) / len(losses[:20]),
                loss_last=sum(losses[-50:]) / len(losses[-50:]),
                test_accuracy=accuracy, seconds=timer(),
                layer_names=[p[2] for p in pairs],
                channels=[n.num_features for n in norms])


# ----------------------------------------------------------------- worker
def worker(rank, port, args, out_dir, errors):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings('ignore', message='.*broadcast_buffers')
    warnings.filterwarnings('ignore', message='Grad strides do not match')
    try:
        dist.init_process_group('gloo', rank=rank, world_size=WORLD)
        data = load_digits_split(split_seed=0, size=16)
        result = dict(rank=rank, threads=torch.get_num_threads())
        result['torch_syncbn'] = check_torch_syncbn(rank)
        result['baseline_check'] = check_baseline(rank, args, data)
        counter = CollectiveCounter()
        if 'bytes' in args.parts:
            result['bytes'] = measure_bytes(rank, args, data, counter)
        if 'speed' in args.parts:
            result['speed'] = measure_speed(rank, args, data)
        if 'stats' in args.parts:
            gen = torch.Generator().manual_seed(7)
            ref_idx = torch.randperm(len(data[0]), generator=gen)[
                :args.ref_size]
            result['stats'] = []
            for name in STATS_VARIANTS:
                run = stats_run(rank, name, args, data, ref_idx)
                result['stats'].append(run)
                if rank == 0:
                    print(f"  stats {name}: {run['seconds']:.0f} s, loss "
                          f"{run['loss_first']:.3f} -> {run['loss_last']:.3f}"
                          f", test acc {run['test_accuracy']:.1f}",
                          flush=True)
        torch.save(result, osp.join(out_dir, f'rank{rank}.pt'))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: B902 (reported to the parent)
        errors.put((rank, traceback.format_exc()))
        raise


def run_two_processes(args, out_dir):
    ctx = multiprocessing.get_context('spawn')
    errors = ctx.Queue()
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=worker,
                         args=(rank, port, args, out_dir, errors))
             for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if not errors.empty():
        rank, text = errors.get()
        raise SystemExit(f'rank {rank} failed:\n{text}')
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f'exit codes {[p.exitcode for p in procs]}')
    return [torch.load(osp.join(out_dir, f'rank{r}.pt'), weights_only=False)
            for r in range(WORLD)]


# ---------------------------------------------------------------- summary
def summarize_speed(ranks):
    """Medians per variant: wall time of a step (the slower process: the
    step is done when both are) and CPU time (mean of the processes)."""
    wall, cpu = {}, {}
    for name in SPEED_VARIANTS:
        wall[name] = [max(ts) for ts in zip(*(r['speed']['wall'][name]
                                              for r in ranks))]
        cpu[name] = [statistics.fmean(ts) for ts in zip(
            *(r['speed']['cpu'][name] for r in ranks))]
    med_wall = {k: statistics.median(v) * 1e3 for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
    pair = {'SyncBN': 'BN', 'SyncCBN w1': 'BN', 'SyncCBN w4': 'CBN w4',
            'SyncCBN w8': 'CBN w8'}

    def quartiles(v):
        q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
        return [q[0] * 1e3, q[2] * 1e3]

    rows = []
    for name in SPEED_VARIANTS:
        rows.append(dict(
            norm=name, reps=len(wall[name]),
            step_ms=med_wall[name], step_ms_iqr=quartiles(wall[name]),
            vs_bn=med_wall[name] / med_wall['BN'],
            vs_unsynced=(med_wall[name] / med_wall[pair[name]]
                         if name in pair else None),
            cpu_ms=med_cpu[name], cpu_ms_iqr=quartiles(cpu[name]),
            cpu_vs_bn=med_cpu[name] / med_cpu['BN'],
            cpu_vs_unsynced=(med_cpu[name] / med_cpu[pair[name]]
                             if name in pair else None)))
    latency = {
        str(numel): 1e3 * statistics.median(
            max(ts) for ts in zip(*(r['speed']['all_reduce_s'][numel]
                                    for r in ranks)))
        for numel in ranks[0]['speed']['all_reduce_s']}
    return rows, latency


def summarize_stats(ranks, args):
    rows = []
    per_variant = {}
    for vi, name in enumerate(STATS_VARIANTS):
        runs = [r['stats'][vi] for r in ranks]
        recs = [rec for run in runs for rec in run['records']]
        by_t = {}
        for rec in recs:
            by_t.setdefault(rec['t'], []).append(rec)
        n_layers = len(runs[0]['layer_names'])
        by_layer = [
            dict(mean=statistics.fmean(r['mean'] for r in recs
                                       if r['layer'] == li),
                 var=statistics.fmean(r['var'] for r in recs
                                      if r['layer'] == li))
            for li in range(n_layers)
        ]
        # identical statistics on both processes? (pooled norms must be)
        same = all(
            a['used_mean'] == b['used_mean'] and a['used_var'] == b['used_var']
            for a, b in zip(runs[0]['records'], runs[1]['records']))
        per_variant[name] = dict(
            mean_error=statistics.fmean(r['mean'] for r in recs),
            var_error=statistics.fmean(r['var'] for r in recs),
            by_t={t: dict(mean=statistics.fmean(r['mean'] for r in v),
                          var=statistics.fmean(r['var'] for r in v))
                  for t, v in sorted(by_t.items())},
            by_layer=by_layer,
            same_stats_on_both_processes=same,
            images=images_per_statistic(name, args.batch),
            lr=runs[0]['lr'], burnin=runs[0]['burnin'],
            loss_first=runs[0]['loss_first'],
            loss_last=statistics.fmean(r['loss_last'] for r in runs),
            test_accuracy_rank0=runs[0]['test_accuracy'],
            seconds=max(r['seconds'] for r in runs))
    base = per_variant['SyncCBN w4']
    for name, v in per_variant.items():
        rows.append(dict(norm=name, **{k: v[k] for k in (
            'images', 'mean_error', 'var_error',
            'same_stats_on_both_processes', 'loss_last',
            'test_accuracy_rank0')},
            mean_vs_synccbn=v['mean_error'] / base['mean_error'],
            var_vs_synccbn=v['var_error'] / base['var_error']))
    return rows, per_variant


POOLS = {'BN': 'nothing (this process, this iteration)',
         'SyncBN': 'processes', 'SyncCBN w1': 'processes',
         'SyncCBN w2': 'processes x 2 iterations',
         'CBN w4': 'iterations (4)', 'SyncCBN w4': 'both (2 x 4)',
         'CBN w8': 'iterations (8)', 'SyncCBN w8': 'both (2 x 8)'}


def tables(result, args):
    out = {}
    if 'bytes' in result:
        rows = []
        for name in BYTES_VARIANTS:
            b = result['bytes'][name]
            kind, window = VARIANTS[name]
            if kind == 'syncbn':
                fwd, bwd = 'all_gather 2 x (2C + 1)', 'all_reduce 2C'
            elif kind == 'synccbn':
                fwd = f'all_reduce {window} x (1 + 2C)'
                bwd = 'all_reduce 2C'
            else:
                fwd = bwd = '-'
            rows.append([
                name, fwd, bwd, b['forward_numel'], b['backward_numel'],
                f"{b['bytes_per_step'] / 1024:.1f}",
                'yes' if b['matches_formula'] else 'NO',
                f"{b['ddp_bytes_per_step'] / 2**20:.2f}"])
        out['bytes'] = markdown_table(
            ['norm', 'forward, per layer', 'backward, per layer',
             'forward numbers (20 layers)', 'backward numbers',
             'KiB per step (float32)', 'every call = formula',
             'DDP gradients, MiB per step'], rows)
    if 'speed' in result:

        def ratio(v):
            return '' if v is None else f'{v:.2f}'

        rows = [[
            r['norm'], POOLS[r['norm']], f"{r['step_ms']:.0f}",
            f"{r['vs_bn']:.2f}", ratio(r['vs_unsynced']),
            f"{r['cpu_ms']:.0f}", f"{r['cpu_vs_bn']:.2f}",
            ratio(r['cpu_vs_unsynced'])
        ] for r in result['speed']]
        out['speed'] = markdown_table(
            ['norm', 'pools', 'wall ms', 'x BN', 'x unsynced', 'CPU ms',
             'x BN', 'x unsynced'], rows)
    if 'stats' in result:
        rows = [[
            r['norm'], POOLS[r['norm']], r['images'],
            f"{r['mean_error']:.4f}", f"{r['mean_vs_synccbn']:.2f}x",
            f"{r['var_error']:.4f}", f"{r['var_vs_synccbn']:.2f}x",
            f"{r['loss_last']:.3f}", f"{r['test_accuracy_rank0']:.1f}"
        ] for r in result['stats']]
        out['stats'] = markdown_table(
            ['norm', 'pools', 'images per statistic', 'mean error',
             'x SyncCBN w4', 'var error', 'x SyncCBN w4',
             'train loss (last 50 it)', 'test acc. % (rank 0)'], rows)
    return out


def plot(result, per_variant, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    n_axes = ('speed' in result) + 3 * ('stats' in result)
    if not n_axes:
        return
    fig, axes = plt.subplots(1, n_axes, figsize=(4.6 * n_axes, 4.2),
                             squeeze=False)
    axes = list(axes[0])
    if 'speed' in result:
        ax = axes.pop(0)
        rows = result['speed']
        pos = list(range(len(rows)))
        ax.barh([p - 0.2 for p in pos], [r['vs_bn'] for r in rows],
                height=0.4, color='tab:blue', label='wall time')
        ax.barh([p + 0.2 for p in pos], [r['cpu_vs_bn'] for r in rows],
                height=0.4, color='tab:orange', label='CPU time')
        ax.set_yticks(pos, [r['norm'] for r in rows])
        ax.axvline(1.0, color='k', lw=0.8)
        ax.invert_yaxis()
        ax.legend(fontsize=7)
        ax.set_xlabel('training step / BN (medians, same run)')
        ax.set_title('step time, 2 gloo processes x 1 thread', fontsize=9)
    if 'stats' in result:
        colors = dict(zip(STATS_VARIANTS, ['tab:gray', 'tab:orange',
                                           'tab:green', 'tab:olive',
                                           'tab:blue']))
        for stat, ax in zip(('mean', 'var'), axes):
            for name, v in per_variant.items():
                ts = sorted(v['by_t'])
                ax.plot(ts, [v['by_t'][t][stat] for t in ts], marker='o',
                        ms=3, color=colors[name],
                        label=f"{name} ({v['images']} images)")
            ax.set_yscale('log')
            ax.set_xlabel('probe iteration (after burn-in)')
            ax.set_ylabel(f'relative error of the {stat}')
            ax.set_title(f'{stat} used vs population (20 layers, 2 '
                         'processes)', fontsize=9)
            ax.grid(alpha=0.3, which='both')
            ax.legend(fontsize=7)
        ax = axes[2]
        for name, v in per_variant.items():
            ax.plot(range(len(v['by_layer'])),
                    [e['var'] for e in v['by_layer']], marker='o', ms=3,
                    color=colors[name], label=name)
        ax.set_yscale('log')
        ax.set_xlabel('norm layer (forward order; spatial size 16 -> 2)')
        ax.set_ylabel('relative error of the var')
        ax.set_title('var used vs population, by layer (all probes)',
                     fontsize=9)
        ax.grid(alpha=0.3, which='both')
    fig.tight_layout()
    save_png(fig, path, dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument('--parts', nargs='+', default=['bytes', 'speed',
                                                       'stats'],
                        choices=['bytes', 'speed', 'stats'])
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--batch', type=int, default=2,
                        help='images per process and iteration')
    parser.add_argument('--widths', type=int, nargs='+',
                        default=[32, 64, 128, 256])
    parser.add_argument('--blocks', type=int, nargs='+', default=[2, 2, 2, 2])
    parser.add_argument('--reps', type=int, default=40,
                        help='timed steps per variant')
    parser.add_argument('--check-steps', type=int, default=6)
    parser.add_argument('--iters', type=int, default=480,
                        help='training iterations of the statistics study')
    parser.add_argument('--burnin', type=int, default=120,
                        help='CBN/SyncCBN burn-in (iterations)')
    parser.add_argument('--probe-every', type=int, default=20)
    parser.add_argument('--lr', type=float, default=None,
                        help='default 0.1 x global batch / 32')
    parser.add_argument('--ref-size', type=int, default=512,
                        help='reference images for population statistics')
    args = parser.parse_args(argv)
    if args.quick:
        args.widths = [8, 16, 32, 64]
        args.reps, args.check_steps = 3, 4
        args.iters, args.burnin, args.probe_every = 40, 10, 6
        args.ref_size = 128
    args.probes = list(range(args.burnin + args.probe_every, args.iters,
                             args.probe_every))
    load_start = os.getloadavg()
    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        ranks = run_two_processes(args, tmp)
    load_end = os.getloadavg()
    result = dict(
        benchmark='sync_cbn',
        machine=dict(machine_info(), torch_threads=ranks[0]['threads'],
                     processes=WORLD, backend='gloo',
                     loadavg_start=list(load_start),
                     loadavg_end=list(load_end)),
        config=dict(
            dataset=dataset_note(16),
            model=dict(type='SmallResNet', widths=args.widths,
                       blocks=args.blocks),
            batch_per_process=args.batch, processes=WORLD, seed=args.seed,
            parts=args.parts, reps=args.reps, iters=args.iters,
            burnin=args.burnin, probes=args.probes, ref_size=args.ref_size,
            syncbn=('CpuSyncBatchNorm2d: torch.nn.SyncBatchNorm\'s '
                    'algorithm and collectives (all_gather of (mean, '
                    'invstd, count) forward, all_reduce of 2C gradient '
                    'sums backward) written for the CPU'),
            metric='||est - pop||_2 / ||pop||_2 over channels per layer, '
            'averaged over layers, probes and processes; est is the '
            '(mean, biased variance) the layer normalized with, pop the '
            'statistics of ref_size training images through a BN copy of '
            'the current network in train mode',
            quick=args.quick),
        torch_syncbn_on_cpu=ranks[0]['torch_syncbn'],
        baseline_check=[r['baseline_check'] for r in ranks])
    if 'bytes' in args.parts:
        result['bytes'] = ranks[0]['bytes']
        result['bytes_equal_on_both_processes'] = (
            ranks[0]['bytes'] == ranks[1]['bytes'])
    if 'speed' in args.parts:
        result['speed'], result['all_reduce_ms'] = summarize_speed(ranks)
        result['speed_raw_s'] = {
            r['rank']: {k: r['speed'][k] for k in ('wall', 'cpu')}
            for r in ranks}
    per_variant = None
    if 'stats' in args.parts:
        result['stats'], per_variant = summarize_stats(ranks, args)
        result['stats_detail'] = {
            k: {kk: vv for kk, vv in v.items()} for k, v in
            per_variant.items()}
    result['tables'] = tables(result, args)
    result['seconds'] = timer()
    tn = result['torch_syncbn_on_cpu']
    print('torch.nn.SyncBatchNorm on the CPU: ' +
          ('runs' if tn['runs'] else f"fails ({tn['error']})"))
    bc = result['baseline_check'][0]
    print(f"CPU SyncBN vs SyncCBN w1 over {bc['steps']} steps: max loss "
          f"diff {bc['max_abs_loss_diff']:.2e}, max state diff "
          f"{bc['max_abs_state_diff']:.2e}")
    for key, table in result['tables'].items():
        print(f'\n### {key}\n{table}')
    if 'all_reduce_ms' in result:
        print('\none all_reduce from a barrier (median, slower process): '
              + ', '.join(
            f'{k} floats {v:.2f} ms'
            for k, v in result['all_reduce_ms'].items()))
    print(f"\nload average {load_start} -> {load_end}; {result['seconds']:.0f}"
          ' s')
    tag = '_quick' if args.quick else ''
    write_json(osp.join(args.out, f'sync_cbn{tag}.json'), result)
    plot(result, per_variant, osp.join(args.out, f'sync_cbn{tag}.png'))
    return result


if __name__ == '__main__':
    main()
