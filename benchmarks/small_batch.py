# Copyright (c) mmcbn contributors. All rights reserved.
"""Does CBN fix small batches? Accuracy vs batch size (paper's Figure 1).

A small ResNet is trained from scratch on scikit-learn's bundled digits
(real 8x8 handwritten digits, no download, kept at 8x8 by default; see
``common.dataset_note``)
with BN at several batch sizes, GN, naive CBN (uncompensated window) and CBN,
for the same number of epochs each (so small batches take more iterations),
with the learning rate scaled linearly with the batch size from a base
(``lr = base_lr * batch / 32``), cosine decay to 0, SGD momentum 0.9.
Test accuracy is measured in eval mode (running statistics), mean +- std
over seeds (seed = initialization, data order, augmentation; the train/test
split is fixed).

    python benchmarks/small_batch.py            # full run (~20 min, 1 thread)
    python benchmarks/small_batch.py --quick    # smoke test (< 1 min)

Writes ``small_batch.json`` and ``small_batch.png`` into ``--out``.
"""
import json
import math
import os.path as osp
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from common import (  # noqa: E402
    benchmark_parser,
    dataset_note,
    evaluate,
    load_digits_split,
    machine_info,
    make_norm_factory,
    markdown_table,
    save_png,
    SmallResNet,
    Timer,
    write_json)

from mmcbn import set_cbn_iteration  # noqa: E402


def run_specs():
    """The runs: name, norm kind, batch size and norm arguments."""
    specs = [
        dict(name=f'BN b{b}', norm='bn', batch=b, kwargs={})
        for b in (2, 4, 8, 16, 32)
    ]
    specs += [
        dict(name='GN b2', norm='gn', batch=2, kwargs=dict(groups=8)),
        dict(name='GN b32', norm='gn', batch=32, kwargs=dict(groups=8)),
        dict(name='naive CBN b2 k8', norm='cbn', batch=2,
             kwargs=dict(window=8, compensate=False), burnin=True),
        dict(name='naive CBN b4 k4', norm='cbn', batch=4,
             kwargs=dict(window=4, compensate=False), burnin=True),
        dict(name='CBN b2 k8', norm='cbn', batch=2,
             kwargs=dict(window=8), burnin=True),
        dict(name='CBN b4 k4', norm='cbn', batch=4,
             kwargs=dict(window=4), burnin=True),
        # the authors' backward rule (past entries constant); the rows
        # above use the window gradient, the library's default
        dict(name="CBN authors' backward b2 k8", norm='cbn', batch=2,
             kwargs=dict(window=8, window_grad=False), burnin=True),
        dict(name="CBN authors' backward b4 k4", norm='cbn', batch=4,
             kwargs=dict(window=4, window_grad=False), burnin=True),
        # ablation: eval statistics from the window, not the batch
        dict(name='CBN b2 k8 wrs', norm='cbn', batch=2,
             kwargs=dict(window=8, running_stats_from='window'),
             burnin=True),
        dict(name='CBN b4 k4 wrs', norm='cbn', batch=4,
             kwargs=dict(window=4, running_stats_from='window'),
             burnin=True),
    ]
    return specs


def augment(x, gen, max_shift):
    """Random translation of each image by up to ``max_shift`` pixels."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    shift = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=gen)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = shift[:, 0] * 2.0 / w
    theta[:, 1, 2] = shift[:, 1] * 2.0 / h
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return F.grid_sample(x, grid, mode='nearest', padding_mode='zeros',
                         align_corners=False)


def train_one(spec, seed, data, args):
    x_tr, y_tr, x_te, y_te = data
    batch = spec['batch']
    iters_per_epoch = len(x_tr) // batch  # drop_last
    total = iters_per_epoch * args.epochs
    kwargs = dict(spec['kwargs'])
    if spec.get('burnin'):
        kwargs['burnin'] = int(round(args.burnin_fraction * total))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    model = SmallResNet(make_norm_factory(spec['norm'], **kwargs),
                        widths=args.widths, blocks=args.blocks)
    lr = args.base_lr * batch / 32
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    opt = torch.optim.SGD([
        dict(params=decay, weight_decay=args.weight_decay),
        dict(params=no_decay, weight_decay=0.)
    ], lr=lr, momentum=0.9, nesterov=False)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / total)))
    timer = Timer()
    cpu0 = time.process_time()
    it = 0
    loss_sum, loss_n = 0.0, 0
    model.train()
    for _ in range(args.epochs):
        xa = augment(x_tr, gen, args.shift)
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(iters_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            set_cbn_iteration(model, it)
            loss = F.cross_entropy(model(xa[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if it >= total - iters_per_epoch:  # last epoch's mean loss
                loss_sum += loss.item()
                loss_n += 1
            it += 1
    train_time = timer()
    train_cpu = time.process_time() - cpu0
    acc = evaluate(model, x_te, y_te)
    acc_pop = evaluate(population_bn_copy(model, spec, args, x_tr), x_te,
                       y_te) if spec['norm'] != 'gn' else acc
    return dict(test_acc=acc, test_acc_population_stats=acc_pop,
                train_loss_last_epoch=loss_sum / max(loss_n, 1),
                iterations=total, lr=lr, burnin=kwargs.get('burnin', 0),
                seconds=train_time, cpu_seconds=train_cpu)


def population_bn_copy(model, spec, args, x_tr):
    """A BN copy of ``model`` whose running statistics are replaced by the
    statistics of the whole (unaugmented) training set, computed in one
    train-mode pass ("precise BN"). A diagnostic only: it tells how much of
    a gap comes from the EMA running statistics used at test time."""
    twin = SmallResNet(make_norm_factory('bn'), widths=args.widths,
                       blocks=args.blocks)
    twin.load_state_dict(model.state_dict())
    for m in twin.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    twin.train()
    with torch.no_grad():
        twin(x_tr)
    return twin


def mean_std(values):
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, s


def summarize(results, specs):
    summary = {}
    for spec in specs:
        accs = [r['test_acc'] for r in results[spec['name']]]
        m, s = mean_std(accs)
        pm, ps = mean_std([r['test_acc_population_stats']
                           for r in results[spec['name']]])
        summary[spec['name']] = dict(
            acc_pop_mean=pm, acc_pop_std=ps,
            norm=spec['norm'], batch=spec['batch'],
            window=spec['kwargs'].get('window', 1),
            compensate=spec['kwargs'].get('compensate',
                                          spec['norm'] == 'cbn'),
            running_stats_from=spec['kwargs'].get('running_stats_from',
                                                  'batch'),
            acc_mean=m, acc_std=s, accs=accs,
            iterations=results[spec['name']][0]['iterations'],
            lr=results[spec['name']][0]['lr'],
            burnin=results[spec['name']][0]['burnin'],
            seconds=sum(r['seconds'] for r in results[spec['name']]),
            cpu_seconds=sum(r.get('cpu_seconds', float('nan'))
                            for r in results[spec['name']]))
    return summary


def compare(summary, a, b):
    """Run ``a`` minus run ``b``: mean accuracy difference with its
    unpaired standard error, and paired over seeds (a seed fixes the
    initialization and, at equal batch size, the data order and
    augmentation, so runs of one seed are paired)."""
    if a not in summary or b not in summary:
        return None
    sa, sb = summary[a], summary[b]
    n = len(sa['accs'])
    diff = sa['acc_mean'] - sb['acc_mean']
    se = math.sqrt((sa['acc_std']**2 + sb['acc_std']**2) / max(n, 1))
    d = [x - y for x, y in zip(sa['accs'], sb['accs'])]
    paired_se = statistics.stdev(d) / math.sqrt(n) if n > 1 else 0.0
    return dict(a=a, b=b, diff=diff, se=se, paired_se=paired_se,
                beyond_2se=bool(diff > 2 * se),
                paired_beyond_2se=bool(diff > 2 * paired_se),
                seeds_a_better=sum(x > 0 for x in d),
                seeds_b_better=sum(x < 0 for x in d))


def plot_title(size, widths, epochs, n_seeds):
    return (f'digits {size}x{size}, SmallResNet {list(widths)}, {epochs} '
            f'epochs, {n_seeds} seeds (mean ± std)')


def plot(summary, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    bn = sorted((v['batch'], v['acc_mean'], v['acc_std'])
                for v in summary.values() if v['norm'] == 'bn')
    if bn:
        b, m, s = zip(*bn)
        ax.errorbar(b, m, yerr=s, marker='o', capsize=3, label='BN')
    styles = {
        'gn': dict(marker='s', color='tab:green', label='GN'),
        'naive': dict(marker='v', color='tab:red', label='naive CBN'),
        'cbn': dict(marker='*', color='tab:purple', label='CBN',
                    markersize=12),
        'wrs': dict(marker='P', color='tab:orange',
                    label='CBN, window running stats'),
        'authors': dict(marker='x', color='tab:gray',
                        label="CBN, authors' backward"),
    }
    seen = set()
    for name, v in summary.items():
        if v['norm'] == 'bn':
            continue
        key = 'gn' if v['norm'] == 'gn' else (
            'naive' if not v['compensate'] else 'wrs' if v.get(
                'running_stats_from', 'batch') == 'window' else
            'authors' if name.startswith("CBN authors'") else 'cbn')
        st = dict(styles[key])
        if key in seen:
            st.pop('label')
        seen.add(key)
        # side by side at the same batch size (log axis)
        x = v['batch'] * {'gn': 0.9, 'naive': 1.08, 'authors': 1.12,
                          'cbn': 1.17, 'wrs': 1.27}[key]
        ax.errorbar([x], [v['acc_mean']], yerr=[v['acc_std']],
                    linestyle='none', capsize=3, **st)
        if v['norm'] == 'cbn':
            ax.annotate(f"k={v['window']}", (x, v['acc_mean']),
                        textcoords='offset points',
                        xytext=(-30, -3) if key == 'naive' else (6, 3),
                        fontsize=8, color=st['color'])
    ax.set_xscale('log', base=2)
    ax.set_xticks(sorted({v['batch'] for v in summary.values()}))
    ax.get_xaxis().set_major_formatter(
        matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel('batch size (images per iteration)')
    ax.set_ylabel('test accuracy (%), eval mode')
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument('--seeds', type=int, nargs='+',
                        default=[0, 1, 2, 3, 4])
    parser.add_argument('--epochs', type=int, default=6)
    parser.add_argument('--base-lr', type=float, default=0.1,
                        help='learning rate at batch 32 (linear scaling)')
    parser.add_argument('--weight-decay', type=float, default=5e-4)
    parser.add_argument('--burnin-fraction', type=float, default=0.25)
    parser.add_argument('--widths', type=int, nargs='+', default=[16, 32, 64])
    parser.add_argument('--blocks', type=int, nargs='+', default=[1, 1, 1])
    parser.add_argument('--size', type=int, default=8)
    parser.add_argument('--shift', type=int, default=1,
                        help='random translation (pixels) for training')
    parser.add_argument('--train-subset', type=int, default=0)
    parser.add_argument('--runs', nargs='+', default=None,
                        help='only the runs with these names')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--replot', metavar='JSON',
                        help='only redraw the plot of an earlier run')
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            old = json.load(f)
        cfg = old['config']
        plot(old['summary'], osp.splitext(args.replot)[0] + '.png',
             plot_title(cfg['image_size'], cfg['model']['widths'],
                        cfg['epochs'], len(cfg['seeds'])))
        return old
    if args.quick:
        args.seeds, args.epochs, args.train_subset = [0, 1], 1, 96
        args.widths = [8, 16, 32]
    torch.set_num_threads(args.threads)
    total_timer = Timer()

    data = load_digits_split(split_seed=0, size=args.size)
    if args.train_subset:
        data = (data[0][:args.train_subset], data[1][:args.train_subset],
                data[2], data[3])
    specs = run_specs()
    if args.runs:
        specs = [s for s in specs if s['name'] in args.runs]
    results = {s['name']: [] for s in specs}
    for seed in args.seeds:
        for spec in specs:
            r = train_one(spec, seed, data, args)
            r['seed'] = seed
            results[spec['name']].append(r)
            print(f"seed {seed} {spec['name']:<17} acc {r['test_acc']:6.2f}"
                  f"  loss {r['train_loss_last_epoch']:.3f}"
                  f"  {r['iterations']} it  {r['seconds']:.1f}s", flush=True)
    summary = summarize(results, specs)
    checks = dict(
        cbn_b2_vs_bn_b2=compare(summary, 'CBN b2 k8', 'BN b2'),
        cbn_b2_vs_naive_b2=compare(summary, 'CBN b2 k8', 'naive CBN b2 k8'),
        cbn_b2_vs_gn_b2=compare(summary, 'CBN b2 k8', 'GN b2'),
        cbn_b2_vs_bn_b32=compare(summary, 'CBN b2 k8', 'BN b32'),
        naive_b2_vs_bn_b2=compare(summary, 'naive CBN b2 k8', 'BN b2'),
        gn_b2_vs_bn_b2=compare(summary, 'GN b2', 'BN b2'),
        cbn_b4_vs_bn_b4=compare(summary, 'CBN b4 k4', 'BN b4'),
        cbn_b4_vs_naive_b4=compare(summary, 'CBN b4 k4', 'naive CBN b4 k4'),
        cbn_b4_vs_bn_b32=compare(summary, 'CBN b4 k4', 'BN b32'),
        wrs_b2_vs_cbn_b2=compare(summary, 'CBN b2 k8 wrs', 'CBN b2 k8'),
        wrs_b4_vs_cbn_b4=compare(summary, 'CBN b4 k4 wrs', 'CBN b4 k4'),
        wrs_b2_vs_bn_b2=compare(summary, 'CBN b2 k8 wrs', 'BN b2'),
        wrs_b4_vs_bn_b4=compare(summary, 'CBN b4 k4 wrs', 'BN b4'),
        cbn_b2_vs_authors_b2=compare(summary, 'CBN b2 k8',
                                     "CBN authors' backward b2 k8"),
        cbn_b4_vs_authors_b4=compare(summary, 'CBN b4 k4',
                                     "CBN authors' backward b4 k4"),
        authors_b2_vs_bn_b2=compare(summary, "CBN authors' backward b2 k8",
                                    'BN b2'),
    )
    checks = {k: v for k, v in checks.items() if v is not None}

    rows = []
    for name, v in summary.items():
        accs = ' '.join(f'{a:.2f}' for a in v['accs'])
        rows.append([
            name, v['batch'], v['window'], v['burnin'], v['iterations'],
            f"{v['lr']:.4g}", f"**{v['acc_mean']:.2f} ± {v['acc_std']:.2f}**",
            accs, f"{v['acc_pop_mean']:.2f} ± {v['acc_pop_std']:.2f}",
            f"{v['seconds']:.0f}"
        ])
    table = markdown_table([
        'run', 'batch', 'window k', 'burn-in it', 'iterations', 'lr',
        'test acc % (mean ± std)', 'per seed',
        'acc, population stats (diagnostic)', 'train s (all seeds)'
    ], rows)
    check_rows = [[
        f"{c['a']} − {c['b']}", f"{c['diff']:+.2f}", f"{c['se']:.2f}",
        'yes' if c['beyond_2se'] else 'no', f"{c['paired_se']:.2f}",
        'yes' if c['paired_beyond_2se'] else 'no',
        f"{c['seeds_a_better']}/{c['seeds_b_better']}"
    ] for c in checks.values()]
    check_table = markdown_table([
        'comparison', 'Δ acc (points)', 's.e.', 'Δ > 2 s.e.',
        'paired s.e.', 'Δ > 2 paired s.e.', 'seeds a better/worse'
    ], check_rows)
    config = dict(
        dataset=dataset_note(args.size), train_images=len(data[0]),
        test_images=len(data[2]), image_size=args.size,
        model=dict(type='SmallResNet (CIFAR-style, BasicBlocks)',
                   widths=args.widths, blocks=args.blocks),
        epochs=args.epochs, seeds=args.seeds,
        optimizer='SGD momentum 0.9, weight decay on conv/fc weights',
        base_lr_at_batch_32=args.base_lr,
        lr_rule='lr = base_lr * batch / 32 (linear scaling), cosine to 0',
        weight_decay=args.weight_decay,
        burnin='CBN burn-in = round(%.2f * total iterations)' %
        args.burnin_fraction,
        augmentation=f'random translation up to {args.shift} px',
        evaluation='eval mode (running statistics), top-1 on the test split',
        gn_groups=8, quick=args.quick)
    print()
    print(f'Dataset: {dataset_note(args.size)}.')
    print(f"SmallResNet widths {args.widths} blocks {args.blocks}, "
          f"{args.epochs} epochs for every run, lr = {args.base_lr} * batch "
          f"/ 32, seeds {args.seeds}")
    print(table)
    print()
    print(check_table)
    total = total_timer()
    cpu = time.process_time()
    print(f'\ntotal time {total:.0f} s wall, {cpu:.0f} s CPU (this process; '
          f'{torch.get_num_threads()} torch thread(s))')
    tag = '_quick' if args.quick else ''
    out = dict(benchmark='small_batch', machine=machine_info(),
               config=config, summary=summary, checks=checks,
               runs=results, total_seconds=total, cpu_seconds=cpu,
               table_markdown=table,
               checks_markdown=check_table)
    write_json(osp.join(args.out, f'small_batch{tag}.json'), out)
    plot(summary, osp.join(args.out, f'small_batch{tag}.png'),
         plot_title(args.size, args.widths, args.epochs, len(args.seeds)))
    return out


if __name__ == '__main__':
    main()
