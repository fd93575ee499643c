# Copyright (c) mmcbn contributors. All rights reserved.
"""Does compensation work? Error of CBN's statistics of earlier iterations.

The paper's Figure 3 analogue. A ResNet-18-layout network (BasicBlocks
2-2-2-2, width 32) is trained with SGD (momentum 0.9, weight decay 1e-4,
constant learning rate) on scikit-learn's bundled digits (see
``common.dataset_note``; upsampled to 16x16). Its norm layers are mmcbn
``CBN2d(window=8)`` kept in burn-in for the whole run: they normalize like
BN (window 1) but record every iteration exactly as CBN does, so at any
iteration ``t`` a layer's ``_windows[0].compensated(t, 8, ...)`` returns
what CBN would normalize with at ``t``. Keeping the trajectory
BN-normalized makes the "true" statistics well defined: at a probe
iteration ``t`` (parameters ``theta_t``), each of the last 7 batches
``t - tau`` is forwarded again through a BN copy of the current network in
train mode (every norm layer normalizes with that batch's own statistics,
as when it was recorded), and the per-channel mean and variance of every
producing conv's output are captured with hooks. These are compared with

* naive: the statistics recorded at ``t - tau`` (what naive CBN averages);
* CBN: what the mmcbn layer computes at ``t`` (first-order Taylor in the
  producing conv's weight only; variance ``max(nu - mu^2, 0)``);
* producer-exact (variance only; for the mean CBN is already exact): the
  exact statistics of ``conv(h_{t-tau}, W_t)``, i.e. the best any
  compensation for the producing conv alone could do. The rest of the error
  comes from the change of the conv's input ``h`` (earlier layers).

Errors are relative L2 norms over channels, ``||est - true|| / ||true||``,
per layer, then averaged over layers and probe iterations. An independent
recomputation of the compensation from stored conv inputs and weight
snapshots checks that the numbers read from the layer are what they claim,
and replaying a batch with unchanged parameters must reproduce what was
recorded (lag 0).

    python benchmarks/stats_error.py           # full run (a few minutes)
    python benchmarks/stats_error.py --quick   # smoke test (< 1 min)

Writes ``stats_error.json`` and ``stats_error.png`` into ``--out``.
"""
import os.path as osp
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from common import (  # noqa: E402
    benchmark_parser,
    conv_norm_pairs,
    dataset_note,
    load_digits_split,
    machine_info,
    make_norm_factory,
    markdown_table,
    save_png,
    SmallResNet,
    Timer,
    write_json)

from mmcbn import window_statistics  # noqa: E402

WINDOW = 8
#: The opt-in fast compensation options, next to exact and naive CBN.
FAST = {
    's2': dict(moment_stride=2),
    'bf16': dict(store_dtype='bfloat16'),
    's2+bf16': dict(moment_stride=2, store_dtype='bfloat16'),
}


def _stats(x):
    x = x.detach().float()
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return mean, var


def _rel(est, true):
    return (torch.linalg.vector_norm(est - true) /
            torch.linalg.vector_norm(true).clamp_min(1e-12)).item()


def _dev(est, ref, true):
    """``||est - ref|| / ||true||``: how far an estimate is from another."""
    return (torch.linalg.vector_norm(est - ref) /
            torch.linalg.vector_norm(true).clamp_min(1e-12)).item()


def fast_errors(variant, fast, comp, true):
    """A fast option's errors: against the truth, and its deviation from
    exact CBN (the option's own cost), both relative to the true statistic.

    Args:
        variant (str): The option's name (a key of :data:`FAST`).
        fast, comp, true (tuple[Tensor]): ``(mean, var)`` of the option, of
            exact CBN and the true statistics.
    """
    out = {}
    for i, stat in enumerate(('mean', 'var')):
        out[f'{variant}_{stat}'] = _rel(fast[i], true[i])
        out[f'{variant}_dev_{stat}'] = _dev(fast[i], comp[i], true[i])
    return out


class ConvTap:
    """Forward hooks on the convs: their inputs (optional) and outputs."""

    def __init__(self, convs, keep_inputs):
        self.inputs, self.outputs = {}, {}
        self.handles = []
        for i, conv in enumerate(convs):
            self.handles.append(conv.register_forward_hook(
                self._hook(i, keep_inputs)))

    def _hook(self, i, keep_inputs):

        def hook(module, inp, out):
            if keep_inputs:
                self.inputs[i] = inp[0].detach()
            self.outputs[i] = out.detach()

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def true_stats(twin, model, convs_twin, x):
    """Per-layer (mean, var) of the conv outputs of batch ``x`` under the
    current parameters of ``model``, every norm normalizing with the batch's
    own statistics (train mode). Nothing of ``model`` is touched."""
    twin.load_state_dict(model.state_dict())
    twin.train()
    tap = ConvTap(convs_twin, keep_inputs=False)
    with torch.no_grad():
        twin(x)
    tap.remove()
    return [_stats(tap.outputs[i]) for i in range(len(convs_twin))]


def layer_compensated(model, layer, t):
    """What the CBN layer would normalize with at iteration ``t`` with its
    full window (it is kept in burn-in): a dict lag -> (mean, var),
    compensated to the current parameters of ``model``."""
    binding = layer.bindings[0]
    assert binding is not None and binding.status == 'bound', binding
    out = window_statistics(model, layer, 0, t, lags=WINDOW - 1)
    assert out
    return {lag: (mean, var) for lag, (mean, var, _) in out.items()}


class Shadows:
    """CBN layers with the opt-in fast options, fed the very inputs of the
    model's layers (a forward hook; their outputs are discarded), so they
    record the same trajectory as the exact layers, each with its options.
    Like the model's layers they stay in burn-in (normalize as BN)."""

    def __init__(self, layers, variants):
        self.layers = {
            name: [
                type(layer)(layer.num_features, eps=layer.eps,
                            window=WINDOW, burnin=10**9, **opts).train()
                for layer in layers
            ]
            for name, opts in variants.items()
        }
        for probe_layers in self.layers.values():
            for layer in probe_layers:
                layer.record_burnin = True  # probed during burn-in
        #: Record in this iteration (off where no probe will look).
        self.active = True
        self.handles = [
            layer.register_forward_hook(self._hook(i))
            for i, layer in enumerate(layers)
        ]

    def _hook(self, i):

        def hook(module, inp, out):
            if module.training and self.active:
                for shadows in self.layers.values():
                    shadows[i](inp[0])

        return hook

    def start_iteration(self, iteration):
        """As ``mmcbn.set_cbn_iteration`` for the model's layers."""
        for shadows in self.layers.values():
            for layer in shadows:
                layer.start_iteration(iteration)

    def remove(self):
        for h in self.handles:
            h.remove()


def producer_exact(rec, weight_now):
    """Statistics of ``conv(h_s, W_t)`` exactly: the best any compensation
    for the producing conv alone can do (the rest of the error comes from
    the change of the conv's input ``h``, i.e. of the earlier layers)."""
    h, conv = rec['h'], rec['conv']
    with torch.no_grad():
        return _stats(F.conv2d(h, weight_now, None, conv.stride,
                               conv.padding, conv.dilation, conv.groups))


def own_compensated(rec, weight_now):
    """Independent first-order compensation from the stored conv input
    ``h_s``, output ``x_s`` and weight ``W_s`` (``x`` is linear in ``W``):

        mean(W) = mean(conv(h_s, W))        (exact for fixed h_s)
        nu(W)  ~= nu_s + 2 mean(x_s * conv(h_s, W - W_s))
    """
    h, x, w_s, conv = rec['h'], rec['x'], rec['w'], rec['conv']
    with torch.no_grad():
        delta = F.conv2d(h, weight_now - w_s, None, conv.stride, conv.padding,
                         conv.dilation, conv.groups)
        mean = (x + delta).mean((0, 2, 3))
        nu = (x * x).mean((0, 2, 3)) + 2 * (x * delta).mean((0, 2, 3))
    return mean, (nu - mean.square()).clamp(0)


def run_trajectory(name, args, data, lr, probes, burnin_iter, n_iters):
    """Train one trajectory and probe the statistics errors at ``probes``."""
    x_tr, y_tr = data[0], data[1]
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(1000 + args.seed)
    norm = make_norm_factory('cbn', window=WINDOW, burnin=10**9,
                             compensate=True)
    model = SmallResNet(norm, widths=args.widths, blocks=args.blocks)
    for m in model.modules():
        if hasattr(m, 'record_burnin'):
            m.record_burnin = True  # its windows are probed in burn-in
    twin = SmallResNet(make_norm_factory('bn'), widths=args.widths,
                       blocks=args.blocks)
    pairs = conv_norm_pairs(model)
    names = [p[2] for p in pairs]
    convs = [p[1] for p in pairs]
    layers = [p[3] for p in pairs]
    convs_twin = [p[1] for p in conv_norm_pairs(twin)]
    shadows = Shadows(layers, FAST)
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([
        dict(params=decay, weight_decay=args.weight_decay),
        dict(params=no_decay, weight_decay=0.)
    ], lr=lr, momentum=0.9)
    # history[s]: batch indices, recorded stats and (for the cross-check)
    # conv inputs/outputs and weights of iteration s; the last WINDOW kept.
    history = {}
    probe_set = set(probes)
    records = []  # one per (probe t, layer, lag)
    wchange = defaultdict(list)  # per layer ||W_t - W_{t-1}|| / ||W_t||
    crosscheck = 0.0
    lag0_check = None
    losses = []
    timer = Timer()
    perm, pos = None, 0
    model.train()
    prev_w = [c.weight.detach().clone() for c in convs]
    for t in range(n_iters):
        if perm is None or pos + args.batch > len(x_tr):
            perm, pos = torch.randperm(len(x_tr), generator=gen), 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        if t in probe_set:
            # Parameters are theta_t (after step t-1); CBN would now
            # normalize with the compensated entries of t-7 .. t-1.
            for s in range(t - WINDOW + 1, t):
                truth = true_stats(twin, model, convs_twin,
                                   x_tr[history[s]['idx']])
                tau = t - s
                for li, layer in enumerate(layers):
                    comp_m, comp_v = layer_compensated(model, layer, t)[tau]
                    rec = history[s]['layers'][li]
                    own_m, own_v = own_compensated(rec, convs[li].weight)
                    crosscheck = max(crosscheck, _rel(own_m, comp_m),
                                     _rel(own_v, comp_v))
                    true_m, true_v = truth[li]
                    _, exact_v = producer_exact(rec, convs[li].weight)
                    record = dict(
                        t=t, layer=li, lag=tau,
                        prodexact_var=_rel(exact_v, true_v),
                        naive_mean=_rel(rec['mean'], true_m),
                        naive_var=_rel(rec['var'], true_v),
                        comp_mean=_rel(comp_m, true_m),
                        comp_var=_rel(comp_v, true_v))
                    for v, fast_layers in shadows.layers.items():
                        fast = layer_compensated(model, fast_layers[li],
                                                 t)[tau]
                        record.update(fast_errors(v, fast, (comp_m, comp_v),
                                                  (true_m, true_v)))
                    records.append(record)
        tap = ConvTap(convs, keep_inputs=True)
        loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
        tap.remove()
        entry = dict(idx=idx, layers=[])
        for li, conv in enumerate(convs):
            mean, var = _stats(tap.outputs[li])
            entry['layers'].append(dict(
                mean=mean, var=var, h=tap.inputs[li], x=tap.outputs[li],
                w=conv.weight.detach().clone(), conv=conv))
        history[t] = entry
        history.pop(t - WINDOW, None)
        if t == 0:  # the replay reproduces what was recorded (lag 0)
            truth = true_stats(twin, model, convs_twin, x_tr[idx])
            lag0_check = max(
                max(_rel(e['mean'], tm), _rel(e['var'], tv))
                for e, (tm, tv) in zip(entry['layers'], truth))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        for li, conv in enumerate(convs):
            w = conv.weight.detach()
            wchange[li].append(
                ((w - prev_w[li]).norm() / w.norm()).item())
            prev_w[li] = w.clone()
    shadows.remove()
    for layer in layers + [x for v in shadows.layers.values() for x in v]:
        assert layer.bindings[0].status == 'bound'
    return dict(name=name, lr=lr, iterations=n_iters, burnin_iter=burnin_iter,
                probes=sorted(probe_set), layer_names=names, records=records,
                weight_change=[wchange[i] for i in range(len(convs))],
                crosscheck_max_rel=crosscheck, lag0_check_max_rel=lag0_check,
                loss_first=sum(losses[:10]) / 10,
                loss_last=sum(losses[-20:]) / 20, seconds=timer())


ERROR_COLUMNS = ('naive_mean', 'naive_var', 'comp_mean', 'comp_var',
                 'prodexact_var') + tuple(
                     f'{v}_{d}{s}' for v in FAST for d in ('', 'dev_')
                     for s in ('mean', 'var'))


def aggregate(records, key_fn, n_layers=None):
    """Mean of the four error columns grouped by ``key_fn(record)``."""
    groups = defaultdict(list)
    for r in records:
        groups[key_fn(r)].append(r)
    out = {}
    for k, rs in sorted(groups.items()):
        out[k] = {
            c: sum(r[c] for r in rs) / len(rs)
            for c in ERROR_COLUMNS
        }
        out[k]['n'] = len(rs)
        out[k]['ratio_mean'] = out[k]['naive_mean'] / max(
            out[k]['comp_mean'], 1e-12)
        out[k]['ratio_var'] = out[k]['naive_var'] / max(
            out[k]['comp_var'], 1e-12)
    return out


def regimes(traj, early_max):
    """Split a trajectory's probes into 'early' (t <= early_max, inside the
    burn-in) and 'after burn-in' (t >= burnin_iter)."""
    out = {}
    early = [r for r in traj['records'] if r['t'] <= early_max]
    late = [r for r in traj['records'] if r['t'] >= traj['burnin_iter']]
    if early:
        out['early'] = early
    if late:
        out['after burn-in'] = late
    return out


def fast_option_tables(by_lag, overall):
    """Markdown tables of the fast options next to naive and exact CBN:
    errors against the truth, and deviation from exact CBN, per lag."""
    rows = [(f'lag {k}', a) for k, a in by_lag.items()]
    rows.append(('all lags', overall))
    stats = ('mean', 'var')
    errors = markdown_table(
        [''] + [f'{stat}: {c}' for stat in stats
                for c in ('naive', 'CBN') + tuple(FAST)],
        [[label] + [f'{a[c]:.4f}' for stat in stats
                    for c in [f'naive_{stat}', f'comp_{stat}'] +
                    [f'{v}_{stat}' for v in FAST]] for label, a in rows])
    deviation = markdown_table(
        [''] + [f'{stat}: {v}' for stat in stats for v in FAST],
        [[label] + [f'{a[f"{v}_dev_{stat}"]:.2e}' for stat in stats
                    for v in FAST] for label, a in rows])
    return errors, deviation


def fmt_row(label, a):
    return [
        label, f"{a['naive_mean']:.4f}", f"{a['comp_mean']:.4f}",
        f"{a['ratio_mean']:.1f}x", f"{a['naive_var']:.4f}",
        f"{a['comp_var']:.4f}", f"{a['ratio_var']:.1f}x",
        f"{a['prodexact_var']:.4f}"
    ]


HEADER = ['', 'mean: naive', 'mean: CBN', 'naive/CBN', 'var: naive',
          'var: CBN', 'naive/CBN', 'var: producer-exact']


def plot(trajs, summary, path, early_max):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(14, 8.5))
    colors = ['tab:blue', 'tab:orange', 'tab:green', 'tab:red', 'tab:purple']
    for row, stat in enumerate(('mean', 'var')):
        ax = axes[row, 0]
        for ci, (tname, regs) in enumerate(summary['by_lag'].items()):
            for rname, agg in regs.items():
                ls = '-' if rname == 'after burn-in' else ':'
                lags = sorted(int(k) for k in agg)
                ax.plot(lags, [agg[str(k)][f'naive_{stat}'] for k in lags],
                        ls, marker='v', color=colors[ci], alpha=0.55,
                        label=f'naive, {tname}, {rname}')
                ax.plot(lags, [agg[str(k)][f'comp_{stat}'] for k in lags],
                        ls, marker='*', color=colors[ci],
                        label=f'CBN, {tname}, {rname}')
        ax.set_yscale('log')
        ax.set_xlabel('lag tau (iterations)')
        ax.set_ylabel(f'relative error of the {stat}')
        ax.set_title(f'{stat}: error vs lag (mean over layers, probes)',
                     fontsize=9)
        ax.grid(alpha=0.3, which='both')
        if row == 0:
            handles, labels = ax.get_legend_handles_labels()
        ax = axes[row, 1]
        for ci, (tname, agg) in enumerate(summary['by_layer'].items()):
            layers = sorted(int(k) for k in agg)
            ax.plot(layers, [agg[str(k)][f'naive_{stat}'] for k in layers],
                    marker='v', color=colors[ci], alpha=0.55,
                    label=f'naive, {tname}')
            ax.plot(layers, [agg[str(k)][f'comp_{stat}'] for k in layers],
                    marker='*', color=colors[ci], label=f'CBN, {tname}')
        ax.set_yscale('log')
        ax.set_xlabel('layer depth (norm layer index, forward order)')
        ax.set_title(f'{stat}: error vs depth (after burn-in, all lags)',
                     fontsize=9)
        ax.grid(alpha=0.3, which='both')
        if row == 0:
            ax.legend(fontsize=6)
        ax = axes[row, 2]
        for ci, (tname, agg) in enumerate(summary['by_t'].items()):
            ts = sorted(int(k) for k in agg)
            ax.plot(ts, [agg[str(k)][f'naive_{stat}'] for k in ts],
                    marker='v', color=colors[ci], alpha=0.55, ms=4,
                    label=f'naive, {tname}')
            ax.plot(ts, [agg[str(k)][f'comp_{stat}'] for k in ts],
                    marker='*', color=colors[ci], ms=5,
                    label=f'CBN, {tname}')
            ax.axvline(trajs[ci]['burnin_iter'], color=colors[ci], ls='--',
                       lw=0.8)
        ax.set_yscale('log')
        ax.set_xlabel('probe iteration t (dashed: end of burn-in)')
        ax.set_title(f'{stat}: error vs training progress (lag {WINDOW-1})',
                     fontsize=9)
        ax.grid(alpha=0.3, which='both')
        if row == 0:
            ax.legend(fontsize=6)
    fig.suptitle('CBN statistics of earlier iterations vs the truth under '
                 'the current network (digits, ResNet-18 layout)',
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(handles, labels, loc='lower center', ncol=4, fontsize=7,
               title='left column: naive = stale statistics, CBN = '
               'compensated; dotted = early (inside burn-in), solid = after '
               'burn-in', title_fontsize=7)
    save_png(fig, path, dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--lr', type=float, default=0.1)
    parser.add_argument('--large-lrs', type=float, nargs='*',
                        default=[0.4, 1.6])
    parser.add_argument('--weight-decay', type=float, default=1e-4)
    parser.add_argument('--widths', type=int, nargs='+',
                        default=[32, 64, 128, 256])
    parser.add_argument('--blocks', type=int, nargs='+', default=[2, 2, 2, 2])
    parser.add_argument('--epochs', type=float, default=4,
                        help='trajectory length')
    parser.add_argument('--burnin-epochs', type=float, default=1)
    parser.add_argument('--probe-every', type=int, default=24)
    parser.add_argument('--early', type=int, nargs='+',
                        default=[7, 10, 15, 20, 30, 45, 60],
                        help='early probe iterations (inside burn-in)')
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.widths, args.blocks = [8, 16, 32], [1, 1, 1]
        args.epochs, args.burnin_epochs = 0.6, 0.3
        args.probe_every, args.early = 10, [7, 15]
        args.large_lrs = [1.6]
    torch.set_num_threads(args.threads)
    total_timer = Timer()
    data = load_digits_split(split_seed=0, size=16)
    per_epoch = len(data[0]) // args.batch
    n_iters = int(round(args.epochs * per_epoch))
    burnin_iter = int(round(args.burnin_epochs * per_epoch))
    early_max = max(args.early)
    probes = sorted(set(args.early) | set(
        range(burnin_iter, n_iters, args.probe_every)))
    trajs = []
    for lr in [args.lr] + list(args.large_lrs):
        name = f'lr {lr:g}'
        traj = run_trajectory(name, args, data, lr, probes, burnin_iter,
                              n_iters)
        trajs.append(traj)
        print(f"{name}: {traj['iterations']} iterations, loss "
              f"{traj['loss_first']:.3f} -> {traj['loss_last']:.3f}, "
              f"{traj['seconds']:.0f}s, cross-check "
              f"{traj['crosscheck_max_rel']:.1e}, lag-0 replay "
              f"{traj['lag0_check_max_rel']:.1e}", flush=True)

    summary = dict(by_lag={}, by_layer={}, by_t={}, overall={},
                   weight_change={})
    tables = []
    for traj in trajs:
        regs = regimes(traj, early_max)
        summary['by_lag'][traj['name']] = {
            rname: {str(k): v for k, v in aggregate(
                rs, lambda r: r['lag']).items()}
            for rname, rs in regs.items()
        }
        summary['overall'][traj['name']] = {
            rname: aggregate(rs, lambda r: 'all')['all']
            for rname, rs in regs.items()
        }
        late = regs.get('after burn-in', traj['records'])
        summary['by_layer'][traj['name']] = {
            str(k): v
            for k, v in aggregate(late, lambda r: r['layer']).items()
        }
        summary['by_t'][traj['name']] = {
            str(k): v for k, v in aggregate(
                [r for r in traj['records'] if r['lag'] == WINDOW - 1],
                lambda r: r['t']).items()
        }
        wc = traj['weight_change']
        summary['weight_change'][traj['name']] = dict(
            early=sum(sum(w[:early_max]) / early_max for w in wc) / len(wc),
            after_burnin=sum(
                sum(w[traj['burnin_iter']:]) /
                max(len(w) - traj['burnin_iter'], 1) for w in wc) / len(wc))
        for rname, agg in summary['by_lag'][traj['name']].items():
            rows = [fmt_row(f'lag {k}', v) for k, v in agg.items()]
            rows.append(fmt_row('**all lags**',
                                summary['overall'][traj['name']][rname]))
            ts = sorted({r['t'] for r in regs[rname]})
            title = (f"{traj['name']}, {rname} (probes t = "
                     f"{ts[0]}..{ts[-1]}, {len(ts)} probes)")
            tables.append((title, markdown_table(HEADER, rows)))
    # depth table for the main trajectory
    main_t = trajs[0]
    depth_rows = [
        fmt_row(f"{k}: {main_t['layer_names'][int(k)]}", v)
        for k, v in summary['by_layer'][main_t['name']].items()
    ]
    tables.append((f"{main_t['name']}, after burn-in, by layer (all lags)",
                   markdown_table(HEADER, depth_rows)))
    # early-training table by probe iteration (lag 7)
    for traj in trajs:
        rows = [fmt_row(f't = {k}', v)
                for k, v in summary['by_t'][traj['name']].items()
                if int(k) <= early_max or int(k) == traj['burnin_iter']]
        tables.append((f"{traj['name']}, lag {WINDOW - 1} by probe "
                       f"iteration (early training)",
                       markdown_table(HEADER, rows)))

    # the fast options next to exact and naive CBN (after burn-in, by lag)
    for traj in trajs:
        agg = summary['by_lag'][traj['name']].get('after burn-in')
        if agg:
            errors, deviation = fast_option_tables(
                agg, summary['overall'][traj['name']]['after burn-in'])
            tables.append((f"{traj['name']}, after burn-in: fast options "
                           '(relative error vs the truth)', errors))
            tables.append((f"{traj['name']}, after burn-in: fast options, "
                           'deviation from exact CBN (||fast - CBN|| / '
                           '||true||)', deviation))

    # target: compensated error >= 5x smaller than naive at every lag after
    # burn-in (on the average over layers and probes).
    target = {}
    for traj in trajs:
        agg = summary['by_lag'][traj['name']].get('after burn-in', {})
        target[traj['name']] = dict(
            min_ratio_mean=min(v['ratio_mean'] for v in agg.values()),
            min_ratio_var=min(v['ratio_var'] for v in agg.values()),
            met=all(v['ratio_mean'] >= 5 and v['ratio_var'] >= 5
                    for v in agg.values()))
    config = dict(
        dataset=dataset_note(16),
        model=dict(type='SmallResNet (ResNet-18 layout when blocks 2-2-2-2)',
                   widths=args.widths, blocks=args.blocks,
                   norm_layers=len(main_t['layer_names'])),
        norm=(f'mmcbn CBN2d(window={WINDOW}) kept in burn-in: normalizes as '
              'BN, records every iteration like CBN'),
        fast_options={v: opts for v, opts in FAST.items()},
        fast_note='fast variants are CBN2d layers with those options fed '
        'the same inputs as the exact layers (same trajectory); '
        '<v>_dev_* = ||fast - exact CBN|| / ||true||',
        batch=args.batch, optimizer='SGD momentum 0.9, constant lr',
        lrs=[t['lr'] for t in trajs], weight_decay=args.weight_decay,
        iterations=n_iters, burnin_iter=burnin_iter, probes=probes,
        early_max=early_max, seed=args.seed,
        metric='||est - true||_2 / ||true||_2 over channels per layer, '
        'averaged over layers and probe iterations; var is the biased '
        'variance, CBN\'s is max(nu_comp - mu_comp^2, 0)',
        truth='the old batch forwarded through a BN copy of the current '
        'network in train mode (norms use the batch\'s own statistics)',
        quick=args.quick)
    print(f'\nDataset: {dataset_note(16)}.')
    print(f"Model: SmallResNet widths {args.widths} blocks {args.blocks} "
          f"({len(main_t['layer_names'])} CBN layers), batch {args.batch}, "
          f"SGD m0.9 wd {args.weight_decay}, {n_iters} iterations, burn-in "
          f"{burnin_iter}")
    for title, table in tables:
        print(f'\n### {title}\n{table}')
    print('\nrelative weight change per iteration ||dW||/||W|| (mean over '
          'convs):')
    for name, v in summary['weight_change'].items():
        print(f"  {name}: early {v['early']:.2e}, after burn-in "
              f"{v['after_burnin']:.2e}")
    print('\ntarget (CBN error >= 5x below naive at every lag after burn-in):')
    for name, v in target.items():
        print(f"  {name}: {'met' if v['met'] else 'NOT met'} (min ratio "
              f"mean {v['min_ratio_mean']:.1f}x, var "
              f"{v['min_ratio_var']:.1f}x)")
    total = total_timer()
    cpu = time.process_time()
    print(f'\ntotal time {total:.0f} s wall, {cpu:.0f} s CPU (this process; '
          f'{torch.get_num_threads()} torch thread(s))')
    tag = '_quick' if args.quick else ''
    out = dict(
        benchmark='stats_error', machine=machine_info(), config=config,
        summary=summary, target=target,
        trajectories=[{k: v for k, v in t.items()
                       if k not in ('records', 'weight_change')}
                      for t in trajs],
        tables={title: table for title, table in tables},
        total_seconds=total, cpu_seconds=cpu)
    write_json(osp.join(args.out, f'stats_error{tag}.json'), out)
    plot(trajs, summary, osp.join(args.out, f'stats_error{tag}.png'),
         early_max)
    return out


if __name__ == '__main__':
    main()
