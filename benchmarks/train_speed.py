# Copyright (c) mmcbn contributors. All rights reserved.
"""Train-step speed and memory of CBN, part by part against each part's
floor: CBN windows 1-16, the opt-in fast options, BN, GN and the authors'
algorithm; ResNet-50 and the paper placement in Faster R-CNN.

All variants of a model are timed in ONE process, round-robin (one step of
each in turn, medians), so machine load affects them alike; the tables
report ratios from the same run. Peak memory is measured per variant in a
fresh subprocess, together with the exact bytes of CBN's window state.

Per part (``benchmarks/cbn_parts.py``): every CBN variant with a window
of 2 or more is instrumented from the outside (mmcbn's functions are
wrapped in this process), each part is timed inside real steps, and then
again on the captured tensors next to its floor, round-robin:

* normalization vs BN's forward + backward on the same tensors;
* recording vs one conv weight-gradient per layer (d nu / dW) and one
  write of it;
* compensation vs a ``copy_`` of the stored window entries;
* everything else (Python, bookkeeping) = CBN step - BN step - the other
  parts' extra.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_speed.py --reps 5
    python benchmarks/train_speed.py --device cuda     # CUDA events
    python benchmarks/train_speed.py --quick           # smoke test

(On a CPU shared with other jobs, OpenMP's busy-waiting threads slow every
variant down several times; ``OMP_WAIT_POLICY=PASSIVE`` avoids that.
Denormal floats are flushed to zero unless ``--keep-denormals``: in a run
without it the BN detector's box-head fc hit denormal slow paths, 1.4 s of
its 10 s step, and the comparison measured that instead of the norms.)
"""
import functools
import json
import math
import os
import os.path as osp
import resource
import statistics
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import mmcbn  # noqa: E402,F401

from cbn_parts import (PARTS, PartProbe, detail_line,  # noqa: E402
                       part_table, replay_parts)
from common import (DeviceClock, benchmark_parser, device_name,  # noqa: E402
                    load_average, machine_info, time_round_robin)

NORMS = {
    'BN': dict(type='BN'),
    'GN': dict(type='GN', num_groups=32),
    'CBN w1': dict(type='CBN', window=1),
    'CBN w2': dict(type='CBN', window=2),
    'CBN w4': dict(type='CBN', window=4),
    'CBN w8': dict(type='CBN', window=8),
    'CBN w16': dict(type='CBN', window=16),
    # the authors' backward rule: the window gradient's cost is the
    # difference to 'CBN w8'
    'CBN w8 const. entries': dict(type='CBN', window=8, window_grad=False),
    # upstream-normalization compensation: its cost is the difference to
    # 'CBN w8' (and the 'upstream' part)
    'CBN w8 upstream': dict(type='CBN', window=8, compensate='upstream',
                            upstream_form='exact'),
    # its fast form (what compensate='upstream' gives)
    'CBN w8 upstream fast': dict(type='CBN', window=8, compensate='upstream',
                                 upstream_form='fast'),
    'authors w8': dict(type='AuthorsCBN', window=8),
    # the batch-2 peers that reparametrize the convolutions (CONV_CFGS)
    'MABN': dict(type='MABN'),
    'GN+WS': dict(type='GN', num_groups=32),
}
#: The upstream compensation's levers (benchmarks/upstream_levers.py): run
#: by name only (--variants), not by default (the exact ones take seconds
#: per step).
UPSTREAM_LEVERS = {
    'CBN w8 upstream mean': dict(type='CBN', window=8, compensate='upstream',
                                 upstream_form='mean'),
    'CBN w8 upstream feed1': dict(type='CBN', window=8,
                                  compensate='upstream', upstream_feeding=1,
                                  upstream_form='exact'),
    'CBN w8 upstream s2': dict(type='CBN', window=8, compensate='upstream',
                               moment_stride=2, upstream_form='exact'),
    'CBN w8 upstream bf16': dict(type='CBN', window=8, compensate='upstream',
                                 store_dtype='bfloat16',
                                 upstream_form='exact'),
}
#: The conv layers of the variants that do not use plain convolutions:
#: MABN behind weight-centred convolutions, GN behind weight-standardized.
CONV_CFGS = {'MABN': dict(type='ConvWC'), 'GN+WS': dict(type='ConvWS')}
#: The opt-in fast options, at the configs' window 4 and at 8.
FAST = {
    's2': dict(moment_stride=2),
    'bf16': dict(store_dtype='bfloat16'),
    's2+bf16': dict(moment_stride=2, store_dtype='bfloat16'),
}
for _window in (4, 8):
    for _name, _opts in FAST.items():
        NORMS[f'CBN w{_window} {_name}'] = dict(type='CBN', window=_window,
                                                **_opts)
NORMS.update(UPSTREAM_LEVERS)
#: Detector variants: the config's norm (CBN k = 4 in FPN + 4conv1fc head),
#: its BN/GN baselines, and the config with both fast options.
DETECTOR = {
    'BN': ('bn', {}),
    'GN': ('gn', {}),
    'CBN': ('cbn', {}),
    'CBN s2+bf16': ('cbn', FAST['s2+bf16']),
}
#: The issue's goal for every part (and overall) against its floor.
LIMIT = 1.2


def with_parts(name):
    """Variants whose parts are measured: CBN with a window of 2 or more."""
    cfg = NORMS.get(name, {})
    return cfg.get('type') == 'CBN' and cfg.get('window', 1) >= 2


def register_authors():
    from mmengine.registry import MODELS
    from authors_cbn import AuthorsCBN2d
    if MODELS.get('AuthorsCBN') is None:
        MODELS.register_module('AuthorsCBN', module=AuthorsCBN2d)


@functools.lru_cache(maxsize=None)
def backbone_source() -> str:
    """``'mmdet'`` where mmdet's ResNet imports, else ``'plain'`` (decided
    once per process: a failing import is not retried per model)."""
    try:
        from mmdet.models.backbones import ResNet  # noqa: F401
    except ImportError:
        return 'plain'
    return 'mmdet'


class Classifier(nn.Module):
    """A ResNet (mmdet's) with every norm chosen, plus a linear head.

    Where mmdet cannot be imported (a GPU machine with no mmcv build for
    its CUDA) the backbone is :class:`plain_resnet.PlainResNet`, the same
    architecture written out; :func:`backbone_source` says which.
    """

    def __init__(self, depth, norm_cfg, num_classes=10, conv_cfg=None):
        super().__init__()
        if backbone_source() == 'mmdet':
            from mmdet.models.backbones import ResNet
            self.backbone = ResNet(
                depth, norm_cfg=norm_cfg, norm_eval=False, frozen_stages=-1,
                out_indices=(3, ), conv_cfg=conv_cfg)
        else:
            if conv_cfg is not None:
                raise SystemExit(f'conv_cfg {conv_cfg} needs mmdet\'s ResNet')
            from plain_resnet import PlainResNet
            self.backbone = PlainResNet(depth, norm_cfg)
        channels = 512 if depth < 50 else 2048
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x)[0].mean((2, 3)))


def make_resnet_step(depth, norm_cfg, size, device='cpu', seed=0,
                     conv_cfg=None):
    torch.manual_seed(seed)
    model = Classifier(depth, norm_cfg, conv_cfg=conv_cfg).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                          weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, size, size, generator=gen).to(device)
    y = torch.tensor([1, 2], device=device)

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return model, step


def make_detector_step(variant, size, device='cpu', quick=False):
    """Faster R-CNN R50-FPN as configured in configs/faster_rcnn (the norm
    in the FPN and the 4conv1fc box head, the paper placement). ``quick``
    samples 32 RoIs per image instead of 512 (a smoke test)."""
    from mmengine.config import Config
    from mmengine.optim import OptimWrapper
    from mmengine.registry import DefaultScope
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules
    register_all_modules(False)
    norm, options = DETECTOR[variant]
    cfg = Config.fromfile(
        osp.join(ROOT, 'configs', 'faster_rcnn',
                 f'faster-rcnn_r50_fpn_{norm}-neck-head_1x_coco.py'))
    cfg.model.backbone.init_cfg = None
    if quick:
        cfg.model.train_cfg.rcnn.sampler.num = 32
    if options:
        cfg.model.neck.norm_cfg.update(options)
        cfg.model.roi_head.bbox_head.norm_cfg.update(options)
    with DefaultScope.overwrite_default_scope('mmdet'):
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
    model.to(device)
    model.train()
    # burn-in is given in epochs; one iteration per "epoch" here, so the
    # window is full after warm-up
    mmcbn.set_cbn_epoch_length(model, 1)
    wrapper = OptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    batch = demo_mm_inputs(
        batch_size=2, image_shapes=[(3, size, size)] * 2, num_items=[4, 3],
        num_classes=80)
    gen = torch.Generator().manual_seed(0)
    batch['inputs'] = [
        torch.randint(0, 255, x.shape, generator=gen, dtype=torch.uint8)
        for x in batch['inputs']
    ]
    return model, lambda: model.train_step(batch, wrapper)


def state_per_weight(model):
    """Window-state bytes / (producer weight bytes in float32 x stored
    iterations), over all layers: 1.0 means one float32 weight-sized tensor
    per stored entry (about 0.5 with bfloat16 storage). mmcbn allocates its
    ring buffer for ``window - 1`` entries at once; the authors' layer
    grows a list, so its current length counts."""
    state = stored = 0
    for module in model.modules():
        if hasattr(module, '_windows'):  # mmcbn's CBN
            for binding, window in zip(module.bindings, module._windows):
                if binding is not None and binding.status == 'bound' and \
                        window.nbytes():
                    numel = math.prod(binding.key[2])  # the weight shape
                    stored += numel * 4 * window.capacity
                    state += window.nbytes()
        elif hasattr(module, 'history') and module.history:  # authors'
            w = module.history[0][0]
            stored += w.numel() * w.element_size() * len(module.history)
            state += module.window_state_nbytes()
    return state / stored if stored else None


def window_bytes(model):
    total = 0
    for module in model.modules():
        nbytes = getattr(module, 'window_state_nbytes', None)
        if callable(nbytes):
            total += nbytes()
    return total


def window_bytes_by_buffer(model):
    """Bytes of mmcbn's window state per stored field (``var_grad`` is the
    weight-sized d nu / dW)."""
    out = {}
    for module in model.modules():
        for window in getattr(module, '_windows', ()):
            for name, buf in window._buffers.items():
                out[name] = out.get(name, 0) + buf.numel() * \
                    buf.element_size()
    return out


def time_fusion(convs, reps, clock):
    """What the d nu / dW product would cost fused into the conv's own
    backward (a question of the recording floor).

    For every conv: (a) the backward the step runs anyway (input and
    weight gradient of a ``grad_output``); (b) (a) plus the separate
    d nu / dW product, what CBN does; (c) the input gradient plus ONE
    weight-gradient call over ``[grad_output, 2x/m]`` stacked along the
    output channels (weight rows stacked likewise), which shares the
    im2col/GEMM pass. ``c - a`` is the product's marginal cost when fused.

    Returns:
        dict: Median milliseconds of (a), (b) and (c) over all convs.
    """
    from mmcbn.binding import _conv_weight_grad
    cases = []
    for x, inp, prod in convs:
        grad = torch.randn_like(x)
        m = x.numel() // x.shape[1]
        w = prod.weight
        nd = inp.dim() - 2
        conv = (list(prod.stride), list(prod.padding), list(prod.dilation),
                False, [0] * nd, prod.groups)
        both = torch.cat([grad, x * (2.0 / m)], 1)
        w2 = torch.cat([w, w], 0)
        cases.append((grad, x, inp, w, both, w2, conv, prod))

    def regular():
        for grad, x, inp, w, both, w2, conv, prod in cases:
            torch.ops.aten.convolution_backward(grad, inp, w, None, *conv,
                                                [True, True, False])

    def separate():
        for grad, x, inp, w, both, w2, conv, prod in cases:
            torch.ops.aten.convolution_backward(grad, inp, w, None, *conv,
                                                [True, True, False])
            _conv_weight_grad(x, inp, w.shape, prod)

    def fused():
        for grad, x, inp, w, both, w2, conv, prod in cases:
            if prod.groups == 1:
                torch.ops.aten.convolution_backward(grad, inp, w, None,
                                                    *conv,
                                                    [True, False, False])
                torch.ops.aten.convolution_backward(both, inp, w2, None,
                                                    *conv,
                                                    [False, True, False])
            else:  # stacking rows breaks the group layout: not fused
                torch.ops.aten.convolution_backward(grad, inp, w, None,
                                                    *conv,
                                                    [True, True, False])
                _conv_weight_grad(x, inp, w.shape, prod)

    # the stacked call computes the same two gradients
    err = 0.0
    with torch.no_grad():
        for grad, x, inp, w, both, w2, conv, prod in cases:
            if prod.groups != 1:
                continue
            ref_w = torch.ops.aten.convolution_backward(
                grad, inp, w, None, *conv, [False, True, False])[1]
            ref_g = _conv_weight_grad(x, inp, w.shape, prod) * (
                2.0 / (x.numel() // x.shape[1]))
            got = torch.ops.aten.convolution_backward(
                both, inp, w2, None, *conv, [False, True, False])[1]
            for ref, part in ((ref_w, got[:len(w)]), (ref_g, got[len(w):])):
                err = max(err, ((part - ref).norm() /
                                ref.norm().clamp_min(1e-30)).item())
    fns = dict(regular=regular, separate=separate, fused=fused)
    with torch.no_grad():
        times = time_round_robin(clock, fns, reps, warmup=1)
    out = {f'{name}_ms': 1e3 * t for name, t in times.items()}
    out['fused_max_rel_diff'] = err
    out['convs'] = len(cases)
    out['floor_separate_ms'] = out['separate_ms'] - out['regular_ms']
    out['floor_fused_ms'] = out['fused_ms'] - out['regular_ms']
    return out


def time_subsampling(convs, reps, clock, stride=2):
    """What ``moment_stride`` saves in the d nu / dW products on this
    device: (a) the exact products; (b) the strided weight-gradient calls
    ``moment_stride`` makes (``Producer._subsampled``, stride x s); (c) the
    same, but with the input of 1x1 convs sliced to the used pixels first
    and a stride-1 call (the same numbers: a 1x1 conv reads one pixel per
    output position).

    Returns:
        dict: Median milliseconds of (a), (b), (c) over all convs, the
        number of 1x1 convs, and the largest relative difference of (c)
        from (b).
    """
    from mmcbn.binding import _conv_weight_grad, _ConvArgs
    cases = []
    for x, inp, prod in convs:
        phase = tuple(min(1, n - 1) for n in x.shape[2:])
        fx, finp, conv = prod._subsampled(x, inp, stride, phase)
        one = all(k == 1 for k in prod.weight.shape[2:]) and \
            not any(prod.padding)
        sliced = None
        if one:
            step = [stride * s for s in prod.stride]
            sinp = inp[(slice(None), slice(None)) + tuple(
                slice(p * s, None, st)
                for p, s, st in zip(phase, prod.stride, step))]
            sliced = (fx, sinp, _ConvArgs(prod.groups, (1, ) * len(step),
                                          (0, ) * len(step), prod.dilation))
        cases.append((x, inp, prod, fx, finp, conv, sliced))

    def exact():
        for x, inp, prod, *_ in cases:
            _conv_weight_grad(x, inp, prod.weight.shape, prod)

    def strided():
        for x, inp, prod, fx, finp, conv, _ in cases:
            _conv_weight_grad(fx, finp, prod.weight.shape, conv)

    def sliced_1x1():
        for x, inp, prod, fx, finp, conv, sliced in cases:
            if sliced is None:
                _conv_weight_grad(fx, finp, prod.weight.shape, conv)
            else:
                _conv_weight_grad(sliced[0], sliced[1], prod.weight.shape,
                                  sliced[2])

    err = 0.0
    for x, inp, prod, fx, finp, conv, sliced in cases:
        if sliced is not None:
            ref = _conv_weight_grad(fx, finp, prod.weight.shape, conv)
            got = _conv_weight_grad(sliced[0], sliced[1], prod.weight.shape,
                                    sliced[2])
            err = max(err, ((got - ref).norm() /
                            ref.norm().clamp_min(1e-30)).item())
    fns = dict(exact=exact, strided=strided, sliced_1x1=sliced_1x1)
    times = time_round_robin(clock, fns, reps, warmup=1)
    out = {f'{name}_ms': 1e3 * t for name, t in times.items()}
    out.update(stride=stride, convs=len(cases),
               convs_1x1=sum(c[-1] is not None for c in cases),
               sliced_max_rel_diff=err)
    return out


def run_paired(steps, base, warmups, reps, clock):
    """Step times of every variant, each step paired with a step of the
    ``base`` variant just before it (a shared machine's load drifts less
    between two consecutive steps than over a round of all variants).

    Returns:
        dict: name -> (median step seconds, median of step / base step,
        median of step - base step).
    """
    for name, step in steps.items():
        for _ in range(warmups[name]):
            step()
    times = {name: [] for name in steps}
    pairs = {name: [] for name in steps if name != base}
    for _ in range(reps):
        for name, step in steps.items():
            if name == base:
                times[name].append(clock.time(step))
                continue
            first = clock.time(steps[base])
            times[base].append(first)
            times[name].append(clock.time(step))
            pairs[name].append((times[name][-1], first))
    out = {base: (statistics.median(times[base]), 1.0, 0.0)}
    for name, p in pairs.items():
        out[name] = (statistics.median(times[name]),
                     statistics.median(t / b for t, b in p),
                     statistics.median(t - b for t, b in p))
    return out


def measure_parts(step, base_step, clock, device, reps, instrumented):
    """Each part of one CBN variant: inside ``instrumented`` real steps,
    each paired with a step of the BN model (``base_step``) just before it
    (medians), and replayed next to its floor (``reps``, round-robin).

    Returns:
        tuple: ``(replay, in_step, paired_extra, calls, info)``.
    """
    per_step = {part: [] for part in PARTS}
    per_detail = {}
    extras = []
    calls = None
    for _ in range(instrumented):
        base = clock.time(base_step)
        with PartProbe(clock) as probe:
            total = clock.time(step)
            totals, calls, details = probe.step_parts()
        extras.append(total - base)
        for part in PARTS:
            per_step[part].append(totals[part][0])
        for name, seconds in details.items():
            per_detail.setdefault(name, []).append(seconds)
    in_step = {p: statistics.median(v) for p, v in per_step.items()}
    details = {k: 1e3 * statistics.median(v) for k, v in per_detail.items()}
    with PartProbe(clock, capture=True) as probe:
        step()
    clock.totals()  # drop the capture step's intervals
    replay, info = replay_parts(clock, probe, device, reps)
    info['in_step_details_ms'] = details
    return replay, in_step, statistics.median(extras), calls, info


def peak_memory(kind, variant, args):
    """Peak memory (MB) of a fresh process running ``variant``'s steps."""
    cmd = [sys.executable, osp.abspath(__file__), '--measure-memory', kind,
           variant, '--threads', str(args.threads), '--device', args.device]
    if args.quick:
        cmd.append('--quick')
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_rss_mb():
    """This process's peak RSS (VmHWM). Unlike ru_maxrss it starts afresh
    at exec: Linux carries ru_maxrss over from the forking parent."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory_child(kind, variant, args):
    register_authors()
    torch.set_num_threads(args.threads)
    before = _peak_rss_mb()
    if kind == 'resnet':
        model, step = make_resnet_step(args.depth, NORMS[variant], args.size,
                                       args.device,
                                       conv_cfg=CONV_CFGS.get(variant))
        window = NORMS[variant].get('window', 1)
    else:
        model, step = make_detector_step(variant, args.det_size,
                                         args.device, args.quick)
        window = 8  # burn-in of 3 + window of 4
    for _ in range(2 if args.quick else window + 1):
        step()
    out = dict(peak_mb=_peak_rss_mb(), model_mb=before,
               window_mb=window_bytes(model) / 2**20)
    if args.device.startswith('cuda'):
        out['peak_cuda_mb'] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def analyse(name, model_name, steps, times, base, clock, args, reps,
            instrumented):
    """The per-part row of one CBN variant (``base``: the BN variant)."""
    replay, in_step, extra, calls, info = measure_parts(
        steps[name], steps[base], clock, args.device, reps, instrumented)
    row = part_table(extra, replay, in_step, LIMIT)
    row.update(model=model_name, norm=name, calls=calls,
               step_extra_ms=1e3 * times[name][2],
               **{k: v for k, v in info.items() if k != 'convs'})
    return row, info['convs']


def main():
    parser = benchmark_parser(
        __doc__, 'smoke test of every code path (timings meaningless)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--reps', type=int, default=None,
                        help='timed steps per variant (and replays per '
                        'part)')
    parser.add_argument('--device', default='cpu',
                        help='cpu or cuda (CUDA events for timing)')
    parser.add_argument('--variants', nargs='+', default=None,
                        help='ResNet variants to run (BN is always added)')
    parser.add_argument('--det-reps', type=int, default=None,
                        help='timed detector steps (default: --reps)')
    parser.add_argument('--no-detector', action='store_true')
    parser.add_argument('--no-memory', action='store_true',
                        help='skip the peak-memory subprocesses')
    parser.add_argument('--keep-denormals', action='store_true',
                        help='do not flush denormal floats to zero (on the '
                        'CPU they make some matrix products many times '
                        'slower, in whichever model happens to produce '
                        'them)')
    parser.add_argument('--measure-memory', nargs=2, metavar=('KIND', 'V'))
    args = parser.parse_args()
    if not args.keep_denormals:
        torch.set_flush_denormal(True)
    # --quick is a smoke test of every code path (timings meaningless)
    args.depth = 18 if args.quick else 50
    args.size = 32 if args.quick else 224
    args.det_size = 64 if args.quick else 320
    reps = args.reps or (1 if args.quick else 7)
    instrumented = 1 if args.quick else 5
    if args.measure_memory:
        return measure_memory_child(*args.measure_memory, args)
    register_authors()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = DeviceClock(device)
    os.makedirs(args.out, exist_ok=True)
    suffix = '_quick' if args.quick else ''
    load_before = load_average()
    started = time.time()

    variants = [n for n in NORMS if n not in UPSTREAM_LEVERS] \
        if args.variants is None else \
        ['BN'] + [v for v in args.variants if v != 'BN']
    models, steps = {}, {}
    for name in variants:
        models[name], steps[name] = make_resnet_step(
            args.depth, NORMS[name], args.size, args.device,
            conv_cfg=CONV_CFGS.get(name))
    # warm-up fills every window
    warmups = {name: (2 if args.quick else 2 + NORMS[name].get('window', 1))
               for name in variants}
    times = run_paired(steps, 'BN', warmups, reps, clock)
    model_name = f'ResNet-{args.depth}' + (
        '' if backbone_source() == 'mmdet' else ' (plain_resnet.py)')
    rows, part_rows, convs = [], [], None
    for name in variants:
        step_s, ratio, extra = times[name]
        row = dict(model=model_name, norm=name, step_ms=1e3 * step_s,
                   ratio_to_bn=ratio, extra_ms=1e3 * extra)
        model = models[name]
        row['layer_types'] = sorted({
            type(m).__name__ for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm,
                              nn.GroupNorm))})
        row['window_state_mb'] = window_bytes(model) / 2**20
        row['window_bytes'] = window_bytes(model)
        row['window_bytes_by_buffer'] = window_bytes_by_buffer(model)
        ratio = state_per_weight(model)
        if ratio is not None:
            row['window_state_per_weight'] = ratio
        if not args.no_memory and (not args.quick or name == 'CBN w8'):
            row.update(peak_memory('resnet', name, args))
        rows.append(row)
    for name in variants:
        if not with_parts(name):
            continue
        prow, captured = analyse(name, model_name, steps, times, 'BN',
                                 clock, args, reps, instrumented)
        prow['window_bytes'] = window_bytes(models[name])
        part_rows.append(prow)
        if name == 'CBN w8':
            convs = captured
        print(f'parts of {name} measured', flush=True)
    fusion = time_fusion(convs, reps, clock) if convs else None
    subsampling = time_subsampling(convs, reps, clock) if convs else None
    del convs

    det_rows = []
    if not args.no_detector and backbone_source() != 'mmdet':
        print('Faster R-CNN: skipped (mmdet cannot be imported here)')
        args.no_detector = True
    if not args.no_detector:
        det_steps, det_models = {}, {}
        for name in DETECTOR:
            det_models[name], det_steps[name] = make_detector_step(
                name, args.det_size, args.device, args.quick)
        # burn-in (3 iterations) + window (4) before timing
        det_reps = args.det_reps or reps
        det_times = run_paired(
            det_steps, 'BN', {n: 4 if args.quick else 8 for n in det_steps},
            det_reps, clock)
        det_name = 'Faster R-CNN R50-FPN'
        for name, (step_s, ratio, extra) in det_times.items():
            row = dict(model=det_name, norm=name, step_ms=1e3 * step_s,
                       ratio_to_bn=ratio, extra_ms=1e3 * extra,
                       window_state_mb=window_bytes(det_models[name]) / 2**20,
                       window_bytes=window_bytes(det_models[name]),
                       window_bytes_by_buffer=window_bytes_by_buffer(
                           det_models[name]))
            if not args.quick and not args.no_memory:
                row.update(peak_memory('detector', name, args))
            det_rows.append(row)
        for name in DETECTOR:
            if DETECTOR[name][0] != 'cbn':
                continue
            prow, _ = analyse(name, det_name, det_steps, det_times, 'BN',
                              clock, args, det_reps, instrumented)
            prow['window_bytes'] = window_bytes(det_models[name])
            part_rows.append(prow)

    summary = dict(limit=LIMIT)
    if 'CBN w8' in times and 'authors w8' in times:
        summary['cbn8_extra_over_authors_extra'] = \
            times['CBN w8'][2] / times['authors w8'][2]
    if 'CBN w16' in times and 'CBN w2' in times:
        summary['w16_over_w2'] = times['CBN w16'][1] / times['CBN w2'][1]
    for prow in part_rows:
        if prow['model'] == model_name and prow['norm'] in ('CBN w4',
                                                            'CBN w8'):
            summary[f"overall_{prow['norm'].split()[1]}"] = \
                prow['overall_ratio']
    if fusion is not None:
        summary['fusion'] = fusion
    if subsampling is not None:
        summary['subsampling'] = subsampling
    load_after = load_average()
    result = dict(
        date=time.strftime('%Y-%m-%d'),
        device=str(device),
        device_name=device_name(device),
        threads=args.threads,
        flush_denormal=not args.keep_denormals,
        load_before=load_before,
        load_after=load_after,
        minutes=(time.time() - started) / 60,
        reps=reps,
        machine=f'{device_name(device)}, {os.cpu_count()} cores, torch '
        f'{torch.__version__}, {args.threads} threads',
        machine_info=machine_info(),
        input=f'2 x 3 x {args.size} x {args.size} (ResNet), 2 x 3 x '
        f'{args.det_size} x {args.det_size} (detector)',
        resnet=rows, detector=det_rows, parts=part_rows, summary=summary)
    with open(osp.join(args.out, f'train_speed{suffix}.json'), 'w') as f:
        json.dump(result, f, indent=1)
    print_table(result)
    plot(result, osp.join(args.out, f'train_speed{suffix}.png'))


def print_table(result):
    print(f"\n{result['date']}, {result['machine']}, {result['input']}, "
          f"load {result['load_before']} -> {result['load_after']}, "
          f"{result['reps']} reps (medians)")
    print('| model | norm | step (ms) | x BN | extra (ms) | window state '
          '(MB) | state / (fp32 weights x stored iters) | peak RSS (MB) |')
    print('|---|---|---|---|---|---|---|---|')
    for row in result['resnet'] + result['detector']:
        ratio = row.get('window_state_per_weight')
        print(f"| {row['model']} | {row['norm']} | {row['step_ms']:.0f} | "
              f"{row['ratio_to_bn']:.2f} | {row['extra_ms']:.0f} | "
              f"{row.get('window_state_mb', 0):.1f} | "
              f"{'' if ratio is None else f'{ratio:.3f}'} | "
              f"{row.get('peak_mb', float('nan')):.0f} |")
    limit = result['summary']['limit']
    print(f'\nPer part, ms (CBN / floor, x floor; "*" = within {limit}x). '
          'Parts replayed on the tensors of a real step, next to their '
          'floors; extra = CBN step - BN step, in pairs of steps; '
          'everything else = extra - the parts\' extra; "in step" = the '
          'parts timed inside the real steps.')
    print('| model | norm | extra (ms) | ' + ' | '.join(PARTS) +
          ' | everything else | parts / floors | floors / extra | in step: '
          'norm / rec / comp / wgrad / else |')
    print('|---' * (len(PARTS) + 7) + '|')
    for prow in result['parts']:
        p = prow['parts']
        cells = []
        for part in PARTS:
            q = p[part]
            ratio = '-' if q['ratio'] is None else f"{q['ratio']:.2f}"
            cells.append(f"{q['cbn_ms']:.0f} / {q['floor_ms']:.0f}, "
                         f"{ratio}{'*' if q['within'] else ''}")
        eff = prow['extra_efficiency']
        in_step = ' / '.join(
            f"{p[k]['in_step_ms']:.0f}" for k in PARTS + ('everything else',))
        print(f"| {prow['model']} | {prow['norm']} | "
              f"{prow['extra_ms']:.0f} | " + ' | '.join(cells) +
              f" | {p['everything else']['cbn_ms']:.0f} | "
              f"{prow['overall_ratio']:.2f}"
              f"{'*' if prow['overall_within'] else ''} | "
              f"{'' if eff is None else f'{eff:.2f}'} | {in_step} |")
    print('\nInside the steps (ms):')
    for prow in result['parts']:
        print(f"- {prow['model']} {prow['norm']}: "
              f"{detail_line(prow['in_step_details_ms'])}")
    s = result['summary']
    if 'cbn8_extra_over_authors_extra' in s:
        print(f"CBN w8 extra / authors w8 extra = "
              f"{s['cbn8_extra_over_authors_extra']:.2f}")
    if 'w16_over_w2' in s:
        print(f"w16 / w2 = {s['w16_over_w2']:.3f}")
    f = s.get('fusion')
    if f:
        print(f"fusion (all {f['convs']} convs): conv backward "
              f"{f['regular_ms']:.0f} ms; + separate d nu/dW "
              f"{f['separate_ms']:.0f} ms (product "
              f"{f['floor_separate_ms']:.0f} ms); fused weight-gradient "
              f"call {f['fused_ms']:.0f} ms (product "
              f"{f['floor_fused_ms']:.0f} ms)")
    f = s.get('subsampling')
    if f:
        print(f"d nu/dW products ({f['convs']} convs, {f['convs_1x1']} "
              f"1x1): exact {f['exact_ms']:.0f} ms; moment_stride="
              f"{f['stride']} as strided calls {f['strided_ms']:.0f} ms; "
              f"with 1x1 inputs sliced first {f['sliced_1x1_ms']:.0f} ms "
              f"(max rel diff {f['sliced_max_rel_diff']:.1e})")


def plot(result, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = result['resnet']
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    ax = axes[0]
    names = [r['norm'] for r in rows]
    ax.bar(names, [r['ratio_to_bn'] for r in rows], color=[
        'tab:gray' if n in ('BN', 'GN') else
        'tab:red' if n.startswith('authors') else
        'tab:green' if len(n.split()) > 2 else 'tab:blue' for n in names
    ])
    ax.axhline(1.0, color='k', lw=0.8)
    ax.set_ylabel('train step time / BN')
    ax.set_title(f"{rows[0]['model']} train step, {result['input']}",
                 fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=40, ha='right')
    ax = axes[1]
    prows = result['parts']
    labels = [f"{r['norm']}" + (' (det)' if 'Faster' in r['model'] else '')
              for r in prows]
    colors = {'normalization': 'tab:blue', 'recording': 'tab:orange',
              'compensation': 'tab:green', 'window gradient': 'tab:purple',
              'upstream': 'tab:red'}
    for i, prow in enumerate(prows):
        bottom = floor_bottom = 0.0
        for part in PARTS:
            q = prow['parts'][part]
            ax.bar(i - 0.2, q['cbn_ms'], 0.4, bottom=bottom,
                   color=colors[part], label=part if i == 0 else None)
            ax.bar(i + 0.2, q['floor_ms'], 0.4, bottom=floor_bottom,
                   color=colors[part], alpha=0.4)
            bottom += q['cbn_ms']
            floor_bottom += q['floor_ms']
        other = prow['parts']['everything else']['cbn_ms']
        ax.bar(i - 0.2, max(other, 0), 0.4, bottom=bottom, color='tab:gray',
               label='everything else' if i == 0 else None)
    ax.set_xticks(range(len(prows)))
    ax.set_xticklabels(labels, rotation=40, ha='right')
    ax.set_ylabel('ms per step (left: CBN, right, pale: floor)')
    ax.set_title('CBN parts vs their floors', fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == '__main__':
    main()
