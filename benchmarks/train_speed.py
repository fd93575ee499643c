# Copyright (c) mmcbn contributors. All rights reserved.
"""Train-step speed and memory: CBN vs BN vs GN vs the authors' algorithm.

All variants are timed in ONE process, round-robin (one step of each in
turn), so machine load affects them alike; the table reports medians and
ratios to BN from the same run. Peak memory is measured per variant in a
fresh subprocess (peak RSS), together with the exact bytes of CBN's window
state.

The cost floor: per compensated conv and iteration CBN needs one extra
weight-gradient-sized product (d nu / d W). The script times those products
alone, on the same activations, and reports
``efficiency = floor / (CBN step - BN step)``.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_speed.py
    python benchmarks/train_speed.py --quick      # smoke test, < 1 minute

(On a CPU shared with other jobs, OpenMP's busy-waiting threads slow every
variant down several times; ``OMP_WAIT_POLICY=PASSIVE`` avoids that.)
"""
import json
import os
import math
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
from mmcbn import cbn_layers  # noqa: E402

from common import benchmark_parser  # noqa: E402

NORMS = {
    'BN': dict(type='BN'),
    'GN': dict(type='GN', num_groups=32),
    'CBN w1': dict(type='CBN', window=1),
    'CBN w2': dict(type='CBN', window=2),
    'CBN w4': dict(type='CBN', window=4),
    'CBN w8': dict(type='CBN', window=8),
    'CBN w16': dict(type='CBN', window=16),
    'authors w8': dict(type='AuthorsCBN', window=8),
}


def register_authors():
    from mmengine.registry import MODELS
    from authors_cbn import AuthorsCBN2d
    if MODELS.get('AuthorsCBN') is None:
        MODELS.register_module('AuthorsCBN', module=AuthorsCBN2d)


class Classifier(nn.Module):
    """A ResNet (mmdet's) with every norm chosen, plus a linear head."""

    def __init__(self, depth, norm_cfg, num_classes=10):
        super().__init__()
        from mmdet.models.backbones import ResNet
        self.backbone = ResNet(
            depth, norm_cfg=norm_cfg, norm_eval=False, frozen_stages=-1,
            out_indices=(3, ))
        channels = 512 if depth < 50 else 2048
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x)[0].mean((2, 3)))


def make_resnet_step(depth, norm_cfg, size, seed=0):
    torch.manual_seed(seed)
    model = Classifier(depth, norm_cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                          weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, size, size, generator=gen)
    y = torch.tensor([1, 2])

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return model, step


def make_detector_step(norm, size):
    """Faster R-CNN R50-FPN as configured in configs/faster_rcnn."""
    from mmengine.config import Config
    from mmengine.optim import OptimWrapper
    from mmengine.registry import DefaultScope
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules
    register_all_modules(False)
    cfg = Config.fromfile(
        osp.join(ROOT, 'configs', 'faster_rcnn',
                 f'faster-rcnn_r50_fpn_{norm}-neck-head_1x_coco.py'))
    cfg.model.backbone.init_cfg = None
    with DefaultScope.overwrite_default_scope('mmdet'):
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
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
    """Window-state bytes / (producer weight bytes x stored iterations),
    over all layers: 1.0 means one weight-sized tensor per stored entry.
    mmcbn allocates its ring buffer for ``window - 1`` entries at once;
    the authors' layer grows a list, so its current length counts."""
    state = stored = 0
    for module in model.modules():
        if hasattr(module, '_windows'):  # mmcbn's CBN
            for binding, window in zip(module.bindings, module._windows):
                if binding is not None and binding.status == 'bound' and \
                        window.nbytes():
                    # the ring buffer holds `capacity` entries from the
                    # first record on
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


def time_floor(model, step, reps):
    """Time the d nu / d W products alone, on this model's activations."""
    from mmcbn.binding import _conv_weight_grad
    captured = []
    layers = [layer for _, layer in cbn_layers(model)]
    originals = [layer.forward for layer in layers]

    def capture(layer, original):

        def forward(x):
            binding = mmcbn.find_producer(x)
            if binding.status == 'bound' and binding.producer.kind == 'conv':
                prod = binding.producer
                captured.append((x.detach().clone(),
                                 prod._input(torch.float32).clone(), prod))
            return original(x)

        return forward

    for layer, original in zip(layers, originals):
        layer.forward = capture(layer, original)
    step()
    for layer, original in zip(layers, originals):
        layer.forward = original

    def products():
        for x, inp, prod in captured:
            _conv_weight_grad(x, inp, prod.weight.shape, prod)

    products()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        products()
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(captured), captured


def time_fusion(captured, reps):
    """What the floor would cost fused into the conv's own backward.

    For every captured conv: (a) the backward the step runs anyway (input
    and weight gradient of a ``grad_output``); (b) (a) plus the separate
    d nu / d W product, what CBN does now; (c) the input gradient plus ONE
    weight-gradient call over ``[grad_output, 2x/m]`` stacked along the
    output channels (weight rows stacked likewise), which shares the
    im2col/GEMM pass: the fusion the issue suggests. ``c - a`` is the
    floor's marginal cost when fused.

    Returns:
        dict: Median milliseconds of (a), (b) and (c) over all convs.
    """
    from mmcbn.binding import _conv_weight_grad
    cases = []
    for x, inp, prod in captured:
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
    times = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(reps):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    out = {f'{name}_ms': 1e3 * statistics.median(t)
           for name, t in times.items()}
    out['fused_max_rel_diff'] = err
    return out


def run_round_robin(steps, warmup, reps):
    for name, step in steps.items():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory(kind, variant, args):
    """Peak RSS (MB) of a fresh process running ``variant``'s steps."""
    cmd = [sys.executable, osp.abspath(__file__), '--measure-memory', kind,
           variant, '--threads', str(args.threads)]
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
        model, step = make_resnet_step(args.depth, NORMS[variant], args.size)
        window = NORMS[variant].get('window', 1)
    else:
        model, step = make_detector_step(variant, args.det_size)
        window = 8  # burn-in of 3 + window of 4
    for _ in range(2 if args.quick else window + 1):
        step()
    print(json.dumps(dict(peak_mb=_peak_rss_mb(), model_mb=before,
                          window_mb=window_bytes(model) / 2**20)))


def main():
    parser = benchmark_parser(
        __doc__, 'smoke test of every code path (timings meaningless)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--reps', type=int, default=None)
    parser.add_argument('--no-detector', action='store_true')
    parser.add_argument('--measure-memory', nargs=2, metavar=('KIND', 'V'))
    args = parser.parse_args()
    # --quick is a smoke test of every code path (timings meaningless)
    args.depth = 18 if args.quick else 50
    args.size = 32 if args.quick else 224
    args.det_size = 64 if args.quick else 320
    reps = args.reps or (1 if args.quick else 7)
    if args.measure_memory:
        return measure_memory_child(*args.measure_memory, args)
    register_authors()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    suffix = '_quick' if args.quick else ''

    models, steps = {}, {}
    for name, norm in NORMS.items():
        models[name], steps[name] = make_resnet_step(args.depth, norm,
                                                     args.size)
    # warm-up fills every window (16 iterations for the largest)
    warmup = 3 if args.quick else 17
    times = run_round_robin(steps, warmup, reps)
    floor, n_products, captured = time_floor(models['CBN w8'],
                                             steps['CBN w8'], reps)
    fusion = time_fusion(captured, reps)
    del captured
    bn = times['BN']
    rows = []
    for name in NORMS:
        extra = times[name] - bn
        row = dict(model=f'ResNet-{args.depth}', norm=name,
                   step_ms=1e3 * times[name], ratio_to_bn=times[name] / bn,
                   extra_ms=1e3 * extra)
        model = models[name]
        row['window_state_mb'] = window_bytes(model) / 2**20
        ratio = state_per_weight(model)
        if ratio is not None:
            row['window_state_per_weight'] = ratio
        if not args.quick or name == 'CBN w8':
            row.update(peak_memory('resnet', name, args))
        rows.append(row)
    cbn8 = times['CBN w8'] - bn
    authors = times['authors w8'] - bn
    summary = dict(
        floor_ms=1e3 * floor,
        floor_products=n_products,
        efficiency_w8=floor / cbn8 if cbn8 > 0 else float('inf'),
        cbn8_extra_over_authors_extra=cbn8 / authors,
        w16_over_w2=times['CBN w16'] / times['CBN w2'],
        fusion=dict(
            fusion,
            floor_separate_ms=fusion['separate_ms'] - fusion['regular_ms'],
            floor_fused_ms=fusion['fused_ms'] - fusion['regular_ms']))
    summary['fusion']['efficiency_w8_if_fused'] = (
        floor / (cbn8 - floor + summary['fusion']['floor_fused_ms'] / 1e3)
        if cbn8 > 0 else float('inf'))

    det_rows = []
    if not args.no_detector:
        det_steps, det_models = {}, {}
        for norm in ('bn', 'gn', 'cbn'):
            det_models[norm], det_steps[norm] = make_detector_step(
                norm, args.det_size)
        # burn-in (3 iterations) + window (4) before timing
        det_times = run_round_robin(det_steps, 1 if args.quick else 8, reps)
        for norm, t in det_times.items():
            row = dict(model='Faster R-CNN R50-FPN', norm=norm.upper(),
                       step_ms=1e3 * t, ratio_to_bn=t / det_times['bn'],
                       extra_ms=1e3 * (t - det_times['bn']))
            if not args.quick:
                row.update(peak_memory('detector', norm, args))
            det_rows.append(row)

    result = dict(
        date=time.strftime('%Y-%m-%d'),
        machine=f'{os.cpu_count()}-core CPU, torch {torch.__version__}, '
        f'{args.threads} threads',
        input=f'2 x 3 x {args.size} x {args.size} (ResNet), 2 x 3 x '
        f'{args.det_size} x {args.det_size} (detector)',
        resnet=rows, detector=det_rows, summary=summary)
    with open(osp.join(args.out, f'train_speed{suffix}.json'), 'w') as f:
        json.dump(result, f, indent=1)
    print_table(result)
    plot(result, osp.join(args.out, f'train_speed{suffix}.png'))


def print_table(result):
    print(f"{result['date']}, {result['machine']}, {result['input']}")
    print('| model | norm | step (ms) | x BN | extra (ms) | window state '
          '(MB) | state / (weights x stored iters) | peak RSS (MB) |')
    print('|---|---|---|---|---|---|---|---|')
    for row in result['resnet'] + result['detector']:
        ratio = row.get('window_state_per_weight')
        print(f"| {row['model']} | {row['norm']} | {row['step_ms']:.0f} | "
              f"{row['ratio_to_bn']:.2f} | {row['extra_ms']:.0f} | "
              f"{row.get('window_state_mb', 0):.1f} | "
              f"{'' if ratio is None else f'{ratio:.3f}'} | "
              f"{row.get('peak_mb', float('nan')):.0f} |")
    s = result['summary']
    print(f"floor (d nu/dW products alone, {s['floor_products']} convs): "
          f"{s['floor_ms']:.0f} ms; efficiency at w8 = floor / (CBN w8 - "
          f"BN) = {s['efficiency_w8']:.2f}; CBN w8 extra / authors w8 "
          f"extra = {s['cbn8_extra_over_authors_extra']:.2f}; w16 / w2 = "
          f"{s['w16_over_w2']:.3f}")
    f = s['fusion']
    print(f"fusion (all {s['floor_products']} convs): conv backward "
          f"{f['regular_ms']:.0f} ms; + separate d nu/dW "
          f"{f['separate_ms']:.0f} ms (floor {f['floor_separate_ms']:.0f} "
          f"ms); fused weight-gradient call {f['fused_ms']:.0f} ms (floor "
          f"{f['floor_fused_ms']:.0f} ms); efficiency at w8 if CBN's floor "
          f"were fused: {f['efficiency_w8_if_fused']:.2f}")


def plot(result, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = result['resnet']
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [r['norm'] for r in rows]
    ax.bar(names, [r['ratio_to_bn'] for r in rows], color=[
        'tab:gray' if n in ('BN', 'GN') else
        'tab:red' if n.startswith('authors') else 'tab:blue' for n in names
    ])
    ax.axhline(1.0, color='k', lw=0.8)
    ax.set_ylabel('train step time / BN')
    ax.set_title(f"{rows[0]['model']} train step, {result['input']}",
                 fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=30, ha='right')
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == '__main__':
    main()
