# Copyright (c) mmcbn contributors. All rights reserved.
"""Does compensation work in a detector? Statistics error on the demo data.

The detection half of the statistics-error study (``stats_error.py`` is the
classification half, with the method explained there). The model is the
demo's Mask R-CNN (``configs/demo/mask-rcnn_r18_fpn_cbn_demo.py``: half-width
ResNet-18, FPN, 4-conv box head and mask head, CBN in every one of them),
trained from scratch on the demo's generated COCO-format data at 2 images
per iteration with the demo's optimizer (AdamW lr 0.002, weight decay 0.05,
gradient clipping at 10, linear warm-up over the first 100 iterations).

Every CBN layer has ``window=8`` and stays in burn-in for the whole run: it
normalizes like BN but records every iteration as CBN does, so the
trajectory is BN's and "true" statistics are well defined. At a probe
iteration ``t`` each of the last 7 batches is forwarded again (mode
``loss``, with the random state it was first forwarded with, so the RPN and
RoI samplers draw the same way) through a BN copy of the CURRENT network;
the per-channel mean and variance of every CBN layer's input (the producing
conv's output) are compared with

* naive: the statistics recorded at ``t - tau``;
* CBN: what the layer's window state gives at ``t`` (the first-order
  compensation mmcbn normalizes with after burn-in);
* producer-exact (variance): ``conv(h_{t-tau}, W_t)`` exactly, the best a
  compensation of the producing conv alone can do.

The RoI heads see different proposals when the RPN and backbone change, so
their "true" statistics include that drift, which no compensation of the
producing conv can model. Replaying a batch at unchanged parameters must
reproduce what was recorded (checked at ``t = 0``).

    python benchmarks/stats_error_det.py           # full run (minutes)
    python benchmarks/stats_error_det.py --quick   # smoke test (< 1 min)

Writes ``stats_error_det.json`` and ``stats_error_det.png`` into ``--out``.
"""
import copy
import os.path as osp
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from common import (ROOT, Timer, benchmark_parser, machine_info,  # noqa: E402
                    markdown_table, save_png, write_json)
import stats_error  # noqa: E402
from stats_error import (FAST, WINDOW, Shadows, _rel,  # noqa: E402
                         _stats, aggregate, fast_errors)

sys.path.insert(0, osp.join(ROOT, 'tools'))
import demo  # noqa: E402
import make_demo_data  # noqa: E402

HEADER = stats_error.HEADER + ['n']


def build(data_root: str):
    """The demo detector (CBN everywhere), its train dataloader, optimizer."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import Runner

    import mmcbn  # noqa: F401
    cfg = Config.fromfile(demo._config(demo.DET_CONFIG, 'cbn'))
    init_default_scope(cfg.default_scope)
    cfg.train_dataloader.dataset.data_root = osp.join(data_root, 'coco') + '/'
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    model = MODELS.build(cfg.model)
    model.init_weights()
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    return model, loader, optim


class InputTap:
    """Forward pre-hooks on CBN layers: each call's input, in call order."""

    def __init__(self, layers, keep_producer: bool):
        self.calls = defaultdict(list)
        self.handles = [
            layer.register_forward_pre_hook(self._hook(i, keep_producer))
            for i, layer in enumerate(layers)
        ]

    def _hook(self, i, keep_producer):
        from mmcbn.binding import find_producer

        def hook(module, args):
            x = args[0]
            entry = dict(stats=_stats(x))
            if keep_producer:
                binding = find_producer(x)
                assert binding.status == 'bound', binding
                prod = binding.producer
                entry.update(
                    kind=prod.kind, h=prod._input(torch.float32),
                    stride=prod.stride, padding=prod.padding,
                    dilation=prod.dilation, groups=prod.groups)
            self.calls[i].append(entry)

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def producer_exact(entry, weight, bias):
    """Statistics of the producer applied to the recorded input at the
    current parameters (exact for the producing layer alone)."""
    with torch.no_grad():
        w = weight.float()
        b = None if bias is None else bias.float()
        if entry['kind'] == 'conv':
            x = F.conv2d(entry['h'], w, b, entry['stride'], entry['padding'],
                         entry['dilation'], entry['groups'])
        else:
            x = F.linear(entry['h'], w, b)
            x = x[..., None, None] if x.dim() == 2 else x
        return _stats(x)


def loss_forward(model, data):
    losses = model(**data, mode='loss')
    parsed, _ = model.parse_losses(losses)
    return parsed


def run(args):
    from mmcbn import (cbn_layers, producer_parameters, set_cbn_iteration,
                       window_statistics)

    torch.manual_seed(args.seed)
    model, loader, optim = build(args.data_root)
    named = list(cbn_layers(model))
    for _, layer in named:
        layer.window, layer.burnin, layer.burnin_by_epoch = WINDOW, 10**9, \
            False
        layer.record_burnin = True  # its window is probed in burn-in
        layer.reset_window()
    twin = copy.deepcopy(model)
    twin_named = list(cbn_layers(twin))
    for _, layer in twin_named:
        layer.window = 1  # plain BN: every batch its own statistics
    layers = [m for _, m in named]
    twin_layers = [m for _, m in twin_named]
    # the fast options, fed the same inputs (same trajectory)
    shadows = Shadows(layers, FAST)
    base_lrs = [g['lr'] for g in optim.optimizer.param_groups]

    history = {}
    records = []
    order = None  # (layer, position) in forward order: the depth axis
    lag0 = None
    losses = []
    timer = Timer()
    data_iter = iter(loader)
    model.train()

    def sync_twin():
        twin.load_state_dict(model.state_dict())
        twin.train()

    def replay(s):
        """Batch ``s`` through the twin (synced with ``sync_twin``)."""
        tap = InputTap(twin_layers, keep_producer=False)
        saved = torch.get_rng_state()
        torch.set_rng_state(history[s]['rng'])
        set_cbn_iteration(twin, 0)
        with torch.no_grad():
            loss_forward(twin, history[s]['data'])
        torch.set_rng_state(saved)
        tap.remove()
        return tap.calls

    for t in range(args.iters):
        if t in args.probes:
            sync_twin()  # the current parameters, for all 7 replays
            for s in range(t - WINDOW + 1, t):
                truth = replay(s)
                tau = t - s
                rec = history[s]['calls']
                for depth, (li, pos) in enumerate(order):
                    layer = layers[li]
                    if pos >= len(truth[li]) or pos >= len(rec[li]):
                        continue  # e.g. a mask head without positives
                    binding = layer.bindings[pos]
                    weight, bias = producer_parameters(model, binding)
                    comp = window_statistics(model, layer, pos, t,
                                             lags=WINDOW - 1)
                    comp_m, comp_v, _ = comp[tau]
                    true_m, true_v = truth[li][pos]['stats']
                    if true_m.shape != comp_m.shape:
                        continue
                    naive_m, naive_v = rec[li][pos]['stats']
                    _, exact_v = producer_exact(rec[li][pos], weight, bias)
                    record = dict(
                        t=t, layer=depth, lag=tau,
                        naive_mean=_rel(naive_m, true_m),
                        naive_var=_rel(naive_v, true_v),
                        comp_mean=_rel(comp_m, true_m),
                        comp_var=_rel(comp_v, true_v),
                        prodexact_var=_rel(exact_v, true_v))
                    for v, fast_layers in shadows.layers.items():
                        fast = window_statistics(
                            model, fast_layers[li], pos, t,
                            lags=WINDOW - 1)[tau][:2]
                        record.update(fast_errors(v, fast, (comp_m, comp_v),
                                                  (true_m, true_v)))
                    records.append(record)
        try:
            batch = next(data_iter)
        except StopIteration:
            data_iter = iter(loader)
            batch = next(data_iter)
        data = model.data_preprocessor(batch, True)
        rng = torch.get_rng_state()
        factor = min(1.0, 0.01 + 0.99 * t / args.warmup) \
            if args.warmup else 1.0
        for group, lr in zip(optim.optimizer.param_groups, base_lrs):
            group['lr'] = lr * factor
        set_cbn_iteration(model, t)
        shadows.start_iteration(t)
        # the fast layers record only where a probe will read them
        shadows.active = any(0 < p - t < WINDOW for p in args.probes)
        tap = InputTap(layers, keep_producer=True)
        loss = loss_forward(model, data)
        tap.remove()
        if order is None:
            order = [(li, pos) for li in tap.calls  # first-call order
                     for pos in range(len(tap.calls[li]))]
        history[t] = dict(data=data, rng=rng, calls=tap.calls)
        history.pop(t - WINDOW, None)
        if t == 0:
            sync_twin()
            truth = replay(0)
            lag0 = max(
                max(_rel(a['stats'][0], b['stats'][0]),
                    _rel(a['stats'][1], b['stats'][1]))
                for li in range(len(layers))
                for a, b in zip(tap.calls[li], truth[li]))
        optim.update_params(loss)
        losses.append(loss.item())
        if (t + 1) % 50 == 0:
            print(f'iteration {t + 1}/{args.iters}: loss '
                  f'{sum(losses[-50:]) / 50:.3f} ({timer():.0f} s)',
                  flush=True)
    names = [f'{named[li][0]}' + (f'[{pos}]' if pos else '')
             for li, pos in order]
    return dict(records=records, layer_names=names, lag0_check_max_rel=lag0,
                loss_first=sum(losses[:10]) / min(10, len(losses)),
                loss_last=sum(losses[-20:]) / min(20, len(losses)),
                seconds=timer())


def fmt_row(label, a):
    """``stats_error``'s table row plus the number of records."""
    return stats_error.fmt_row(label, a) + [str(a['n'])]


def group_of(name: str) -> str:
    for part in ('backbone', 'neck', 'bbox_head', 'mask_head'):
        if part in name:
            return part
    return 'other'


def plot(summary, names, path, burnin_iter):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    styles = {'early': ':', 'after burn-in': '-'}
    for row, stat in enumerate(('mean', 'var')):
        ax = axes[row, 0]
        for rname, agg in summary['by_lag'].items():
            lags = sorted(int(k) for k in agg)
            ax.plot(lags, [agg[str(k)][f'naive_{stat}'] for k in lags],
                    styles[rname], marker='v', color='tab:gray',
                    label=f'naive, {rname}')
            ax.plot(lags, [agg[str(k)][f'comp_{stat}'] for k in lags],
                    styles[rname], marker='*', color='tab:red',
                    label=f'CBN, {rname}')
            if stat == 'var':
                ax.plot(lags, [agg[str(k)]['prodexact_var'] for k in lags],
                        styles[rname], marker='.', color='tab:blue',
                        label=f'producer-exact, {rname}')
        ax.set_yscale('log')
        ax.set_xlabel('lag tau (iterations)')
        ax.set_ylabel(f'relative error of the {stat}')
        ax.set_title(f'{stat}: error vs lag (mean over layers, probes)',
                     fontsize=9)
        ax.grid(alpha=0.3, which='both')
        ax.legend(fontsize=7)
        ax = axes[row, 1]
        agg = summary['by_layer']
        depth = sorted(int(k) for k in agg)
        ax.plot(depth, [agg[str(k)][f'naive_{stat}'] for k in depth],
                marker='v', color='tab:gray', label='naive')
        ax.plot(depth, [agg[str(k)][f'comp_{stat}'] for k in depth],
                marker='*', color='tab:red', label='CBN')
        prev = None
        for k in depth:
            g = group_of(names[k])
            if g != prev:
                ax.axvline(k - 0.5, color='k', lw=0.6, ls='--')
                ax.text(k - 0.3, 0.03, g, fontsize=7, rotation=90,
                        va='bottom', transform=ax.get_xaxis_transform())
                prev = g
        ax.set_yscale('log')
        ax.set_xlabel('norm layer (forward order)')
        ax.set_title(f'{stat}: error vs depth (after burn-in, all lags)',
                     fontsize=9)
        ax.grid(alpha=0.3, which='both')
        ax.legend(fontsize=7)
    fig.suptitle('Demo Mask R-CNN (ResNet-18/FPN, 2 images/iteration): '
                 'earlier-iteration statistics vs the truth under the '
                 f'current network (burn-in mark at t = {burnin_iter})',
                 fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def main(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--epochs', type=float, default=2,
                        help='trajectory length (default: %(default)s)')
    parser.add_argument('--burnin-epochs', type=float, default=1,
                        help="the demo config's burn-in (default: "
                        '%(default)s); probes after it form the '
                        '"after burn-in" regime')
    parser.add_argument('--warmup', type=int, default=100)
    parser.add_argument('--probe-every', type=int, default=25)
    parser.add_argument('--early', type=int, nargs='+',
                        default=[7, 10, 15, 20, 30, 45, 60, 90],
                        help='probe iterations inside the burn-in')
    parser.add_argument('--data-root', help='demo data (default: data/demo, '
                        'or a temporary folder with --quick)')
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args(argv)
    sizes = demo.QUICK_DATA if args.quick else demo.FULL_DATA
    if args.quick:
        args.epochs, args.burnin_epochs, args.warmup = 3, 2, 4
        args.probe_every, args.early = 4, [7]
    args.data_root = osp.abspath(args.data_root or osp.join(
        ROOT, 'work_dirs', 'stats_error_det_quick', 'data')
        if args.quick else osp.join(ROOT, 'data', 'demo'))
    if not make_demo_data.is_generated(args.data_root, 0, **sizes):
        make_demo_data.generate(args.data_root, 0, **sizes)
    torch.set_num_threads(args.threads)
    per_epoch = sizes['num_train'] // 2
    args.iters = int(round(args.epochs * per_epoch))
    burnin_iter = int(round(args.burnin_epochs * per_epoch))
    early_max = max(args.early)
    args.probes = sorted(
        set(t for t in args.early if WINDOW <= t + 1 <= args.iters) |
        set(range(max(burnin_iter, WINDOW), args.iters, args.probe_every)))
    start = time.perf_counter()
    traj = run(args)
    regs = dict(
        early=[r for r in traj['records'] if r['t'] <= early_max and
               r['t'] < burnin_iter],
        **{'after burn-in': [r for r in traj['records']
                             if r['t'] >= burnin_iter]})
    regs = {k: v for k, v in regs.items() if v}
    late = regs.get('after burn-in', traj['records'])
    summary = dict(
        by_lag={rn: {str(k): v for k, v in aggregate(
            rs, lambda r: r['lag']).items()} for rn, rs in regs.items()},
        overall={rn: aggregate(rs, lambda r: 'all')['all']
                 for rn, rs in regs.items()},
        by_layer={str(k): v for k, v in aggregate(
            late, lambda r: r['layer']).items()},
        by_group={g: aggregate(
            [r for r in late
             if group_of(traj['layer_names'][r['layer']]) == g],
            lambda r: 'all')['all']
            for g in dict.fromkeys(group_of(n)
                                   for n in traj['layer_names'])})
    tables = []
    for rname, agg in summary['by_lag'].items():
        rows = [fmt_row(f'lag {k}', v) for k, v in agg.items()]
        rows.append(fmt_row('**all lags**', summary['overall'][rname]))
        ts = sorted({r['t'] for r in regs[rname]})
        tables.append((f'{rname} (probes t = {ts[0]}..{ts[-1]}, {len(ts)} '
                       'probes)', markdown_table(HEADER, rows)))
    if 'after burn-in' in summary['by_lag']:
        errors, deviation = stats_error.fast_option_tables(
            summary['by_lag']['after burn-in'],
            summary['overall']['after burn-in'])
        tables.append(('after burn-in: fast options (relative error vs the '
                       'truth)', errors))
        tables.append(('after burn-in: fast options, deviation from exact '
                       'CBN (||fast - CBN|| / ||true||)', deviation))
    tables.append(('after burn-in, by part of the detector (all lags)',
                   markdown_table(HEADER, [
                       fmt_row(g, v) for g, v in summary['by_group'].items()
                   ])))
    target = {}
    agg = summary['by_lag'].get('after burn-in', {})
    if agg:
        target = dict(
            min_ratio_mean=min(v['ratio_mean'] for v in agg.values()),
            min_ratio_var=min(v['ratio_var'] for v in agg.values()),
            met=all(v['ratio_mean'] >= 5 and v['ratio_var'] >= 5
                    for v in agg.values()))
    print(f"\nDemo Mask R-CNN, {len(traj['layer_names'])} CBN call sites, "
          f"{args.iters} iterations at 2 images, loss "
          f"{traj['loss_first']:.3f} -> {traj['loss_last']:.3f}, lag-0 "
          f"replay {traj['lag0_check_max_rel']:.1e}")
    for title, table in tables:
        print(f'\n### {title}\n{table}')
    if target:
        print(f"\ntarget (CBN error >= 5x below naive at every lag after "
              f"burn-in): {'met' if target['met'] else 'NOT met'} (min "
              f"ratio mean {target['min_ratio_mean']:.1f}x, var "
              f"{target['min_ratio_var']:.1f}x)")
    tag = '_quick' if args.quick else ''
    out = dict(
        benchmark='stats_error_det',
        machine=machine_info(),
        config=dict(
            model=demo.DET_CONFIG.format(norm='cbn'),
            data=dict(root=osp.relpath(args.data_root, ROOT), **sizes),
            norm=f'CBN window {WINDOW} kept in burn-in (normalizes as BN, '
            'records like CBN)',
            fast_options={v: opts for v, opts in FAST.items()},
            fast_note='fast variants are CBN layers with those options fed '
            'the same inputs as the exact layers (same trajectory); '
            '<v>_dev_* = ||fast - exact CBN|| / ||true||',
            optimizer='AdamW lr 0.002 wd 0.05, clip 10, linear warm-up '
            f'{args.warmup} iterations',
            iterations=args.iters, burnin_iter=burnin_iter,
            probes=args.probes, seed=args.seed, quick=args.quick,
            threads=args.threads),
        layer_names=traj['layer_names'],
        summary=summary,
        target=target,
        lag0_check_max_rel=traj['lag0_check_max_rel'],
        loss_first=traj['loss_first'],
        loss_last=traj['loss_last'],
        tables={title: table for title, table in tables},
        total_seconds=time.perf_counter() - start)
    write_json(osp.join(args.out, f'stats_error_det{tag}.json'), out)
    plot(summary, traj['layer_names'],
         osp.join(args.out, f'stats_error_det{tag}.png'), burnin_iter)
    return out


if __name__ == '__main__':
    main()
