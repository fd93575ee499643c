# Copyright (c) mmcbn contributors. All rights reserved.
"""The normalization budget of CBN, per layer shape of ResNet-50.

For every distinct input shape of a norm layer of ResNet-50 (mmdet's, at
2 x 3 x 224 x 224), time on the same tensors:

* BN: ``F.batch_norm`` in training mode, forward + backward (input, weight
  and bias gradients);
* CBN, given statistics: ``mmcbn.functional.window_norm`` forward +
  backward with the current batch's statistics and a history of 3 earlier
  entries (a window of 4, what the configs use), the issue's definition of
  CBN's normalization;
* CBN, as the layer runs it: the same plus ``batch_stats`` (the current
  batch's mean and variance, which BN's kernel computes inside its forward).

Budget (issue 9): CBN's normalization within 1.15x of BN's, per shape and
over the network (shapes weighted by the number of layers that have them).
On the CPU the script also times each kernel of both paths alone (the
passes over the activations), to show where CBN's extra time goes; that
breakdown mirrors the CPU branch of ``mmcbn/functional.py``.

All timings of a shape are taken round-robin in one process (medians), so
machine load affects BN and CBN alike.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/norm_speed.py
    python benchmarks/norm_speed.py --device cuda
    python benchmarks/norm_speed.py --quick      # smoke test, seconds
"""
import os.path as osp
import sys
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from common import (DeviceClock, benchmark_parser, device_name,  # noqa: E402
                    load_average, machine_info, markdown_table,
                    time_round_robin, write_json)

from mmcbn.functional import (batch_stats, channel_view,  # noqa: E402
                              normalize, window_norm)

#: Earlier entries in the window (window 4).
HISTORY = 3
#: The issue's budget for the normalization part.
BUDGET = 1.15


def norm_input_shapes(depth, size, batch=2):
    """Input shape of every BN layer of mmdet's ResNet-``depth``, in
    forward order (one forward pass with hooks)."""
    from mmdet.models.backbones import ResNet
    model = ResNet(depth, norm_eval=False, frozen_stages=-1,
                   out_indices=(3, ))
    model.train()
    shapes = []
    hooks = [
        m.register_forward_pre_hook(
            lambda m, args: shapes.append(tuple(args[0].shape)))
        for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(torch.randn(batch, 3, size, size))
    for h in hooks:
        h.remove()
    return shapes


class Case:
    """The tensors of one shape and the functions timed on them."""

    def __init__(self, shape, device, seed=0):
        gen = torch.Generator().manual_seed(seed)

        def randn(*s):
            return torch.randn(*s, generator=gen).to(device)

        channels = shape[1]
        self.eps = 1e-5
        self.x = (randn(*shape) * 2 + 0.5).requires_grad_()
        self.grad = randn(*shape)
        self.weight = (randn(channels).abs() + 0.5).requires_grad_()
        self.bias = randn(channels).requires_grad_()
        self.running_mean = torch.zeros(channels, device=device)
        self.running_var = torch.ones(channels, device=device)
        m = self.x.numel() // channels
        with torch.no_grad():
            mean, var = batch_stats(self.x)
        self.mean, self.var = mean, var
        # earlier entries: the batch statistics, moved a little
        self.hist_count = torch.full((HISTORY, ), float(m), device=device)
        self.hist_mean = mean + 0.1 * randn(HISTORY, channels)
        self.hist_var = var * (1 + 0.1 * randn(HISTORY, channels).abs())
        self.inputs = (self.x, self.weight, self.bias)

    def bn(self):
        y = F.batch_norm(self.x, self.running_mean, self.running_var,
                         self.weight, self.bias, True, 0.1, self.eps)
        torch.autograd.grad(y, self.inputs, self.grad)

    def cbn_given(self):
        y, _ = window_norm(self.x, self.weight, self.bias, self.mean,
                           self.var, self.hist_count, self.hist_mean,
                           self.hist_var, self.eps)
        torch.autograd.grad(y, self.inputs, self.grad)

    def cbn_layer(self):
        with torch.no_grad():
            mean, var = batch_stats(self.x)
        y, _ = window_norm(self.x, self.weight, self.bias, mean, var,
                           self.hist_count, self.hist_mean, self.hist_var,
                           self.eps)
        torch.autograd.grad(y, self.inputs, self.grad)

    def check(self):
        """CBN's gradients with a history equal to the batch statistics
        and a window of 1 equal BN's (a sanity check of the setup)."""
        y_bn = F.batch_norm(self.x, None, None, self.weight, self.bias, True,
                            0.0, self.eps)
        ref = torch.autograd.grad(y_bn, self.inputs, self.grad)
        empty = self.hist_count[:0]
        y, _ = window_norm(self.x, self.weight, self.bias, self.mean,
                           self.var, empty, self.hist_mean[:0],
                           self.hist_var[:0], self.eps)
        got = torch.autograd.grad(y, self.inputs, self.grad)
        return max(((a - b).norm() / b.norm().clamp_min(1e-30)).item()
                   for a, b in zip(got, ref))

    def cpu_passes(self):
        """Each kernel of the two CPU paths alone (no autograd).

        Returns:
            dict: name -> function; ``bn_*`` are BN's two kernels,
            ``cbn_*`` the kernels of CBN's CPU path in functional.py.
        """
        x, g = self.x.detach(), self.grad
        w, b = self.weight.detach(), self.bias.detach()
        eps = self.eps
        aten = torch.ops.aten
        _, save_mean, save_invstd = aten.native_batch_norm(
            x, w, b, None, None, True, 0.0, eps)
        mean, invstd = save_mean, save_invstd
        inv_k = 1.0 / (HISTORY + 1)
        scaled_w = w * inv_k
        rest = channel_view(w * invstd * (1 - inv_k), x)
        partial = aten.native_batch_norm_backward(
            g, x, scaled_w, None, None, mean, invstd, True, 0.0,
            [True, False, False])[0]
        var = invstd.pow(-2) - eps
        return dict(
            bn_forward=lambda: aten.native_batch_norm(
                x, w, b, self.running_mean, self.running_var, True, 0.1,
                eps),
            bn_backward=lambda: aten.native_batch_norm_backward(
                g, x, w, self.running_mean, self.running_var, save_mean,
                save_invstd, True, eps, [True, True, True]),
            cbn_batch_stats=lambda: batch_stats(x),
            cbn_normalize=lambda: normalize(x, w, b, mean, var, eps),
            cbn_backward_kernel=lambda: aten.native_batch_norm_backward(
                g, x, scaled_w, None, None, mean, invstd, True, 0.0,
                [True, True, True]),
            cbn_backward_elementwise=lambda: partial.addcmul_(g, rest),
        )


def main(argv=None):
    parser = benchmark_parser(
        __doc__, 'smoke test on ResNet-18 at 32^2 (timings meaningless)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--reps', type=int, default=None)
    parser.add_argument('--device', default='cpu',
                        help='cpu or cuda (CUDA events for timing)')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = DeviceClock(device)
    depth, size = (18, 32) if args.quick else (50, 224)
    reps = args.reps or (2 if args.quick else 15)
    load_before = load_average()
    shapes = norm_input_shapes(depth, size)
    counts = Counter(shapes)
    rows = []
    max_check = 0.0
    for shape, count in counts.items():
        case = Case(shape, device)
        max_check = max(max_check, case.check())
        t = time_round_robin(
            clock, dict(bn=case.bn, cbn_given=case.cbn_given,
                        cbn_layer=case.cbn_layer), reps)
        row = dict(shape=list(shape), layers=count,
                   bn_ms=1e3 * t['bn'], cbn_given_ms=1e3 * t['cbn_given'],
                   cbn_layer_ms=1e3 * t['cbn_layer'],
                   ratio_given=t['cbn_given'] / t['bn'],
                   ratio_layer=t['cbn_layer'] / t['bn'],
                   mbytes=case.x.numel() * case.x.element_size() / 2**20)
        if device.type == 'cpu':
            passes = time_round_robin(clock, case.cpu_passes(), reps)
            row['passes_ms'] = {k: 1e3 * v for k, v in passes.items()}
        rows.append(row)
        print(f"{shape}: x{count}, BN {row['bn_ms']:.2f} ms, CBN "
              f"{row['cbn_given_ms']:.2f} ms ({row['ratio_given']:.2f}x), "
              f"with batch_stats {row['cbn_layer_ms']:.2f} ms "
              f"({row['ratio_layer']:.2f}x)", flush=True)
        del case

    def total(key):
        return sum(r['layers'] * r[key] for r in rows)

    overall = dict(
        layers=len(shapes), shapes=len(rows), bn_ms=total('bn_ms'),
        cbn_given_ms=total('cbn_given_ms'),
        cbn_layer_ms=total('cbn_layer_ms'))
    overall['ratio_given'] = overall['cbn_given_ms'] / overall['bn_ms']
    overall['ratio_layer'] = overall['cbn_layer_ms'] / overall['bn_ms']
    budget = dict(
        budget=BUDGET,
        shapes_within=sum(r['ratio_given'] <= BUDGET for r in rows),
        met_overall=overall['ratio_given'] <= BUDGET,
        met_every_shape=all(r['ratio_given'] <= BUDGET for r in rows))
    passes_total = {}
    if device.type == 'cpu':
        for r in rows:
            for k, v in r['passes_ms'].items():
                passes_total[k] = passes_total.get(k, 0.0) + r['layers'] * v
    load_after = load_average()

    header = ['input shape', 'layers', 'MB', 'BN fwd+bwd (ms)',
              'CBN given stats (ms)', 'x BN', 'CBN + batch_stats (ms)',
              'x BN']
    table_rows = [[
        'x'.join(map(str, r['shape'])), r['layers'], f"{r['mbytes']:.1f}",
        f"{r['bn_ms']:.2f}", f"{r['cbn_given_ms']:.2f}",
        f"{r['ratio_given']:.2f}", f"{r['cbn_layer_ms']:.2f}",
        f"{r['ratio_layer']:.2f}"
    ] for r in rows]
    table_rows.append([
        f"**all {overall['layers']} layers**", overall['layers'], '',
        f"{overall['bn_ms']:.1f}", f"{overall['cbn_given_ms']:.1f}",
        f"**{overall['ratio_given']:.2f}**",
        f"{overall['cbn_layer_ms']:.1f}", f"**{overall['ratio_layer']:.2f}**"
    ])
    table = markdown_table(header, table_rows)
    where = device_name(device)
    print(f'\nResNet-{depth} at 2x3x{size}^2, {where}, {args.threads} '
          f'threads, load {load_before} -> {load_after}, {reps} reps '
          f'(medians)\n{table}')
    verdict = 'met' if budget['met_overall'] else 'NOT met'
    print(f"budget <= {BUDGET}x: overall {verdict}, "
          f"{budget['shapes_within']} of {len(rows)} shapes within")
    passes_table = None
    if passes_total:
        bn_k = passes_total['bn_forward'] + passes_total['bn_backward']
        cbn_k = sum(v for k, v in passes_total.items()
                    if k.startswith('cbn_'))
        passes_table = markdown_table(
            ['kernel (all layers)', 'ms'],
            [[k, f'{v:.1f}'] for k, v in passes_total.items()] +
            [['BN kernels', f'{bn_k:.1f}'], ['CBN kernels', f'{cbn_k:.1f}'],
             ['CBN kernels / BN kernels', f'{cbn_k / bn_k:.2f}']])
        print(f'\nCPU kernels alone (the passes over the activations):\n'
              f'{passes_table}')
    print(f'setup check (CBN window 1 == BN gradients): max rel diff '
          f'{max_check:.1e}')
    suffix = '_quick' if args.quick else ''
    write_json(
        osp.join(args.out, f'norm_speed{suffix}.json'),
        dict(benchmark='norm_speed', machine=machine_info(),
             device=str(device), device_name=where, threads=args.threads,
             load_before=load_before, load_after=load_after,
             model=f'ResNet-{depth}', input=f'2x3x{size}x{size}',
             history=HISTORY, reps=reps, rows=rows, overall=overall,
             budget=budget, passes_total_ms=passes_total,
             check_max_rel=max_check, table=table,
             passes_table=passes_table))


if __name__ == '__main__':
    main()
