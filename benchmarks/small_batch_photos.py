# Copyright (c) mmcbn contributors. All rights reserved.
"""Where BatchNorm fails at small batches: BN, GN, naive CBN and CBN on
crops of real photographs.

Task ("photo regions"): 21 real photographs bundled in installed packages
(18 of scikit-image's data files, scikit-learn's two sample images and
matplotlib's ``grace_hopper.jpg``; no download) are resized to a short side
of 64 px and their central 64 x 64 square is cut into a 2 x 2 grid of
32 x 32 regions. Each region is a class (84 classes); an example is a
16 x 16 crop at a random position inside its region (20 training and 10
test positions per class, disjoint, fixed by the data seed). Colour and
grey-scale photos, textures, text, micrographs and a telescope image make
the per-image statistics very heterogeneous, which is what makes batch
statistics of 2 images noisy (:func:`batch_noise` measures it, against
digits).

Every run trains a 4-stage ResNet (BasicBlocks, widths 16-32-64-128, one
block per stage) from scratch for the same number of epochs, with
``lr = base_lr * batch / 32`` (linear scaling), cosine decay, SGD momentum
0.9, random horizontal flips; test accuracy in eval mode (running
statistics), seeds paired (a seed fixes initialization, data order and
flips for every norm). The runs: BN at batches 2, 4, 8, 32; GN; naive CBN
and CBN (window 8 at batch 2, window 4 at batch 4; burn-in 25% of the
iterations); CBN with ``running_stats_from='window'`` (batch 2); "BN
early, CBN late" (burn-in 50%); and, as a control, BN at batches 2 and 32
on digits with the same network and protocol.

    python benchmarks/small_batch_photos.py          # full run (1 thread)
    python benchmarks/small_batch_photos.py --quick  # smoke test (< 1 min)

Writes ``small_batch_photos.json`` and ``small_batch_photos.png`` into
``--out``. Every finished run is also appended to ``--work-dir``'s
``runs.jsonl``; an interrupted study started again with the same settings
takes its finished runs from there (delete the file to start afresh).
"""
import hashlib
import importlib.util
import json
import os
import copy
import math
import os.path as osp
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from common import (  # noqa: E402
    ROOT,
    benchmark_parser,
    evaluate,
    load_digits_split,
    machine_info,
    make_conv,
    make_norm_factory,
    markdown_table,
    save_png,
    SmallResNet,
    Timer,
    write_json)
from small_batch import compare, mean_std  # noqa: E402

from mmcbn import set_cbn_iteration  # noqa: E402

#: scikit-image's bundled photographs (``skimage/data``) used as sources;
#: synthetic images (logos, phantoms, chessboards) and the right view of
#: the motorcycle stereo pair (a near duplicate) are left out.
SKIMAGE_PHOTOS = ('astronaut.png', 'brick.png', 'camera.png', 'cell.png',
                  'chelsea.png', 'clock_motion.png', 'coffee.png',
                  'coins.png', 'grass.png', 'gravel.png',
                  'hubble_deep_field.jpg', 'ihc.png', 'moon.png',
                  'motorcycle_left.png', 'page.png', 'retina.jpg',
                  'rocket.jpg', 'text.png')


# ---------------------------------------------------------------- data
def source_photos():
    """``[(name, HxWx3 uint8 array)]``: the bundled photographs, in a fixed
    order (grey-scale ones replicated to 3 channels)."""
    from PIL import Image
    spec = importlib.util.find_spec('skimage')
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit('this benchmark needs scikit-image for its bundled '
                         'photographs: pip install scikit-image')
    root = osp.join(list(spec.submodule_search_locations)[0], 'data')
    out = []
    for name in SKIMAGE_PHOTOS:
        with Image.open(osp.join(root, name)) as im:
            out.append((f'skimage/{name}', np.asarray(im.convert('RGB'))))
    from sklearn.datasets import load_sample_images
    sample = load_sample_images()
    for fname, img in zip(sample.filenames, sample.images):
        out.append((f'sklearn/{osp.basename(fname)}', np.asarray(img)))
    import matplotlib.cbook as cbook
    with Image.open(cbook.get_sample_data('grace_hopper.jpg')) as im:
        out.append(('matplotlib/grace_hopper.jpg',
                    np.asarray(im.convert('RGB'))))
    return out


def load_photo_regions(data_seed=0, short=64, grid=2, crop=16, n_train=30,
                       n_test=10, n_photos=None):
    """``(x_train, y_train, x_test, y_test, names)``, ``x`` standardized
    float32 (N, 3, crop, crop) with the training mean/std per channel."""
    from PIL import Image
    rng = np.random.default_rng(data_seed)
    photos = source_photos()[:n_photos]
    cell = short // grid
    side = cell - crop + 1  # positions per axis inside a region
    if n_train + n_test > side * side:
        raise ValueError('not enough crop positions per region')
    xs = {'train': [], 'test': []}
    ys = {'train': [], 'test': []}
    label = 0
    for _, arr in photos:
        h, w = arr.shape[:2]
        s = short / min(h, w)
        size = (max(short, round(w * s)), max(short, round(h * s)))
        img = np.asarray(Image.fromarray(arr).resize(size, Image.BILINEAR),
                         dtype=np.float32) / 255.0
        y0, x0 = (img.shape[0] - short) // 2, (img.shape[1] - short) // 2
        for gy in range(grid):
            for gx in range(grid):
                pos = rng.choice(side * side, n_train + n_test, replace=False)
                for k, p in enumerate(pos):
                    oy = y0 + gy * cell + p // side
                    ox = x0 + gx * cell + p % side
                    split = 'train' if k < n_train else 'test'
                    xs[split].append(img[oy:oy + crop, ox:ox + crop])
                    ys[split].append(label)
                label += 1

    def to_tensor(a):
        return torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).contiguous()

    x_tr, x_te = to_tensor(xs['train']), to_tensor(xs['test'])
    mean = x_tr.mean((0, 2, 3), keepdim=True)
    std = x_tr.std((0, 2, 3), keepdim=True)
    return ((x_tr - mean) / std, torch.tensor(ys['train']),
            (x_te - mean) / std, torch.tensor(ys['test']),
            [n for n, _ in photos])


def load_data(name, args):
    """``dict(x_tr, y_tr, x_te, y_te, classes, channels, note)``."""
    if name == 'photos':
        x_tr, y_tr, x_te, y_te, names = load_photo_regions(
            args.data_seed, args.short, args.grid, args.crop, args.n_train,
            args.n_test, args.n_photos)
        note = (f'{len(names)} bundled photographs ({", ".join(names)}), '
                f'short side {args.short} px, central square in a '
                f'{args.grid}x{args.grid} grid of regions = '
                f'{len(names) * args.grid**2} classes, {args.crop}x'
                f'{args.crop} crops at random positions, {args.n_train} '
                f'train / {args.n_test} test per class (disjoint '
                f'positions, data seed {args.data_seed})')
        return dict(x_tr=x_tr, y_tr=y_tr, x_te=x_te, y_te=y_te,
                    classes=len(names) * args.grid**2, channels=3,
                    note=note)
    x_tr, y_tr, x_te, y_te = load_digits_split(split_seed=0, size=args.crop)
    if args.quick:
        x_tr, y_tr = x_tr[:args.quick_digits], y_tr[:args.quick_digits]
    return dict(x_tr=x_tr, y_tr=y_tr, x_te=x_te, y_te=y_te, classes=10,
                channels=1,
                note=f'scikit-learn digits upsampled to {args.crop}x'
                f'{args.crop}, stratified 80/20 split (control)')


# ---------------------------------------------------------------- runs
def run_specs(quick=False):
    """name, data, norm, batch, norm kwargs, burn-in fraction, and the BN
    run it is paired with (same data and batch).

    CBN runs use the library's default backward (the window gradient,
    ``window_grad=True``) unless named "authors' backward"
    (``window_grad=False``); naive CBN is ``compensate=False`` with
    constant entries, and "naive + window grad" the control that keeps
    naive values but lets the gradient flow as if compensated."""
    s = [dict(name=f'BN b{b}', norm='bn', batch=b, kwargs={})
         for b in (2, 4, 8, 32)]
    s += [
        dict(name='GN b2', norm='gn', batch=2, kwargs=dict(groups=8)),
        dict(name='GN b4', norm='gn', batch=4, kwargs=dict(groups=8)),
        dict(name='GN b32', norm='gn', batch=32, kwargs=dict(groups=8)),
    ]
    for batch, k in ((2, 8), (4, 4)):
        tag = f'b{batch} k{k}'
        s += [
            dict(name=f'naive CBN {tag}', norm='cbn', batch=batch,
                 kwargs=dict(window=k, compensate=False), burnin=0.25),
            dict(name=f"CBN authors' backward {tag}", norm='cbn',
                 batch=batch, kwargs=dict(window=k, window_grad=False),
                 burnin=0.25),
            dict(name=f'CBN {tag}', norm='cbn', batch=batch,
                 kwargs=dict(window=k), burnin=0.25),
            dict(name=f'CBN-w {tag}', norm='cbn', batch=batch,
                 kwargs=dict(window=k, running_stats_from='window'),
                 burnin=0.25),
            dict(name=f'naive + window grad {tag}', norm='cbn',
                 batch=batch, kwargs=dict(window=k, compensate=False,
                                          window_grad=True), burnin=0.25),
            # BN for the first half, CBN for the second
            dict(name=f'BN early, CBN late {tag}', norm='cbn', batch=batch,
                 kwargs=dict(window=k), burnin=0.5),
        ]
    s += [
        dict(name='digits BN b2', norm='bn', batch=2, kwargs={},
             data='digits'),
        dict(name='digits BN b32', norm='bn', batch=32, kwargs={},
             data='digits'),
        dict(name='digits CBN b2 k8', norm='cbn', batch=2,
             kwargs=dict(window=8), burnin=0.25, data='digits'),
        # upstream-normalization compensation (the photo study at tuned
        # learning rates is benchmarks/upstream_study.py)
        dict(name='digits CBN-up b2 k8', norm='cbn', batch=2,
             kwargs=dict(window=8, compensate='upstream',
                         running_stats_from='batch', upstream_form='exact'),
             burnin=0.25,
             data='digits'),
        dict(name='digits CBN-up-w b2 k8', norm='cbn', batch=2,
             kwargs=dict(window=8, compensate='upstream',
                         running_stats_from='window', upstream_form='exact'),
             burnin=0.25,
             data='digits'),
    ]
    # the batch-2 peers and CBN with reparametrized convolutions (the photo
    # study at tuned learning rates is benchmarks/batch2_study.py)
    mabn = dict(buffer_size=16, sma_warmup=100, renorm_warmup=1000)
    up_w = dict(window=8, compensate='upstream', running_stats_from='window',
                upstream_form='exact')
    s += [
        dict(name='digits GN b2', norm='gn', batch=2, kwargs=dict(groups=8),
             data='digits'),
        dict(name='digits GN+WS b2', norm='gn', batch=2,
             kwargs=dict(groups=8), conv='ws', data='digits'),
        dict(name='digits GN+WC b2', norm='gn', batch=2,
             kwargs=dict(groups=8), conv='wc', data='digits'),
        dict(name='digits MABN b2', norm='mabn', batch=2, kwargs=mabn,
             conv='wc', data='digits'),
        dict(name='digits CBN+WS b2 k8', norm='cbn', batch=2,
             kwargs=dict(window=8), burnin=0.25, conv='ws', data='digits'),
        dict(name='digits CBN-up-w+WS b2 k8', norm='cbn', batch=2,
             kwargs=up_w, burnin=0.25, conv='ws', data='digits'),
    ]
    if quick:
        # cross-check: a burn-in longer than the schedule is BN throughout,
        # so this run must reproduce 'BN b2' (same seed) exactly
        s.append(dict(name='CBN b2 k8 all burn-in', norm='cbn', batch=2,
                      kwargs=dict(window=8), burnin=1.0))
    for spec in s:
        spec.setdefault('data', 'photos')
        spec.setdefault('burnin', None)
        prefix = 'digits ' if spec['data'] == 'digits' else ''
        spec['paired_bn'] = f"{prefix}BN b{spec['batch']}"
    return s


def build_model(norm, kwargs, data, args, conv=None):
    return SmallResNet(make_norm_factory(norm, **kwargs), widths=args.widths,
                       blocks=args.blocks, in_channels=data['channels'],
                       num_classes=data['classes'], conv=make_conv(conv))


def population_accuracy(model, data, args, batch=None, num_batches=200,
                        seed=0):
    """Test accuracy of a copy whose running statistics are re-estimated
    with :func:`mmcbn.precise_stats.recompute_statistics` (exactly pooled):
    from the whole training set in one pass (``batch`` None), or, as
    ``PreciseStatsHook`` would, from ``num_batches`` random training
    batches of ``batch`` images. The model itself is left as it is."""
    from mmcbn.precise_stats import recompute_statistics
    twin = copy.deepcopy(model)
    x = data['x_tr']
    if batch is None:
        batches = [x]
    else:
        gen = torch.Generator().manual_seed(5000 + seed)
        batches = [x[torch.randint(len(x), (batch, ), generator=gen)]
                   for _ in range(num_batches)]
    recompute_statistics(twin, batches)
    return evaluate(twin, data['x_te'], data['y_te'])


def train_one(spec, seed, data, args, keep_model=False):
    x_tr, y_tr = data['x_tr'], data['y_tr']
    batch = spec['batch']
    iters_per_epoch = len(x_tr) // batch  # drop_last
    total = iters_per_epoch * args.epochs
    kwargs = dict(spec['kwargs'])
    if spec['burnin'] is not None:
        kwargs['burnin'] = int(round(spec['burnin'] * total))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    model = build_model(spec['norm'], kwargs, data, args, spec.get('conv'))
    lr = args.base_lr * batch / 32
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([
        dict(params=decay, weight_decay=args.weight_decay),
        dict(params=no_decay, weight_decay=0.)
    ], lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / total)))
    timer = Timer()
    losses = []
    it = 0
    # producer weight norms (the stem conv, and the mean over all convs)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norm_at = {}
    burnin_it = kwargs.get('burnin', 0)
    tenth = max(total // 10, 1)

    def weight_norms():
        with torch.no_grad():
            return (model.conv1.weight.norm().item(),
                    statistics.fmean(c.weight.norm().item() for c in convs))

    norm_curve = [weight_norms()]
    model.train()
    # the "ceiling" reference (BN only): the samples of the last
    # ``ceiling - 1`` iterations re-run through the current network with
    # the current batch, BN over all of them, the loss on the current batch
    stored = []
    for _ in range(args.epochs):
        flip = torch.rand(len(x_tr), generator=gen) < 0.5
        xa = torch.where(flip[:, None, None, None], x_tr.flip(3), x_tr)
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(iters_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            set_cbn_iteration(model, it)
            if spec.get('ceiling'):
                out = model(torch.cat([xa[idx]] + stored))[:batch]
                stored = ([xa[idx]] + stored)[:spec['ceiling'] - 1]
            else:
                out = model(xa[idx])
            loss = F.cross_entropy(out, y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            it += 1
            if it == burnin_it:
                norm_at['burnin'] = weight_norms()
            if it % tenth == 0:
                norm_curve.append(weight_norms())
    seconds = timer()
    # mean training loss per tenth of the schedule (shows the burn-in switch)
    curve = [statistics.fmean(losses[i:i + tenth])
             for i in range(0, total - tenth + 1, tenth)]
    acc = evaluate(model, data['x_te'], data['y_te'])
    bn_style = spec['norm'] != 'gn'
    result = dict(
        test_acc=acc,
        test_acc_population_stats=(population_accuracy(model, data, args)
                                   if bn_style else acc),
        # as PreciseStatsHook would: 200 random batches of the run's size
        test_acc_precise_batches=(population_accuracy(
            model, data, args, batch=batch, seed=seed) if bn_style else acc),
        train_acc=evaluate(model, x_tr, y_tr),
        train_loss_last_epoch=statistics.fmean(losses[-iters_per_epoch:]),
        loss_curve=curve, iterations=total, lr=lr,
        train_loss_last_tenth=curve[-1] if curve else float('nan'),
        stem_norm_end=norm_curve[-1][0],
        stem_norm_burnin=norm_at.get('burnin', (float('nan'), ))[0],
        conv_norm_end=norm_curve[-1][1],
        stem_norm_curve=[n[0] for n in norm_curve],
        conv_norm_curve=[n[1] for n in norm_curve],
        burnin=kwargs.get('burnin', 0), seconds=seconds,
        layer_types=sorted({type(m).__name__ for m in model.modules()
                            if isinstance(m, (nn.Conv2d, nn.GroupNorm,
                                              nn.BatchNorm2d))}))
    if keep_model:
        result['model'] = model
    return result


# ---------------------------------------------------------------- why
def batch_noise(model, x, batch, n_batches, gen, chunk=256):
    """How noisy the statistics of ``batch`` images are, per norm layer, in
    a trained network (eval mode, so the network itself is fixed):

    * ``mean_noise``: rms over channels and random batches of
      ``(mu_B - mu) / sigma``;
    * ``var_noise``: rms of ``sigma_B^2 / sigma^2 - 1``;
    * ``between_image``: share of a channel's variance that is variance of
      the per-image means (image-to-image heterogeneity), channel average;

    ``mu``, ``sigma^2``: the statistics of the whole set ``x``.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    sums = {i: [] for i in range(len(norms))}
    handles = [
        m.register_forward_pre_hook(
            lambda mod, inp, i=i: sums[i].append(
                (inp[0].mean((2, 3)), inp[0].pow(2).mean((2, 3)))))
        for i, m in enumerate(norms)
    ]
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            model(x[i:i + chunk])
    for h in handles:
        h.remove()
    idx = torch.randint(len(x), (n_batches, batch), generator=gen)
    out = []
    for i in range(len(norms)):
        m1 = torch.cat([a for a, _ in sums[i]]).double()  # (N, C)
        m2 = torch.cat([b for _, b in sums[i]]).double()
        mu = m1.mean(0)
        var = (m2.mean(0) - mu**2).clamp_min(1e-12)
        mu_b = m1[idx].mean(1)  # (n_batches, C)
        var_b = m2[idx].mean(1) - mu_b**2
        out.append(dict(
            mean_noise=((mu_b - mu)**2 / var).mean().sqrt().item(),
            var_noise=((var_b / var - 1)**2).mean().sqrt().item(),
            between_image=(m1.var(0, unbiased=False) / var).mean().item()))
    return out


def noise_summary(layers):
    """Average of :func:`batch_noise`'s per-layer numbers: all layers, and
    the first and last norm layer."""
    keys = ('mean_noise', 'var_noise', 'between_image')
    return dict(
        all={k: statistics.fmean(lay[k] for lay in layers) for k in keys},
        first={k: layers[0][k] for k in keys},
        last={k: layers[-1][k] for k in keys})


def measure(datasets, models, args, batches=(2, 16)):
    """Batch-statistic noise of each data set's BN b32 network (seed 0)."""
    out = {}
    for name, model in models.items():
        gen = torch.Generator().manual_seed(0)
        out[name] = {
            f'batch {b}': noise_summary(
                batch_noise(model, datasets[name]['x_tr'], b,
                            args.noise_batches, gen))
            for b in batches
        }
    return out


# ---------------------------------------------------------------- report
def _fmean(runs, key):
    """Seed mean of a diagnostic (NaN where a run lacks it)."""
    values = [r.get(key, float('nan')) for r in runs]
    return statistics.fmean(values) if values else float('nan')


def summarize(results, specs):
    summary = {}
    for spec in specs:
        rs = results[spec['name']]
        accs = [r['test_acc'] for r in rs]
        m, s = mean_std(accs)
        pm, ps = mean_std([r['test_acc_population_stats'] for r in rs])
        summary[spec['name']] = dict(
            data=spec['data'], norm=spec['norm'], batch=spec['batch'],
            window=spec['kwargs'].get('window', 1),
            compensate=spec['kwargs'].get('compensate',
                                          spec['norm'] == 'cbn'),
            running_stats_from=spec['kwargs'].get('running_stats_from',
                                                  'batch'),
            burnin_fraction=spec['burnin'], burnin=rs[0]['burnin'],
            conv=spec.get('conv'),
            iterations=rs[0]['iterations'], lr=rs[0]['lr'],
            acc_mean=m, acc_std=s, accs=accs, acc_pop_mean=pm,
            acc_pop_std=ps,
            train_loss_last_epoch=statistics.fmean(
                r['train_loss_last_epoch'] for r in rs),
            train_loss_last_tenth=_fmean(rs, 'train_loss_last_tenth'),
            stem_norm_burnin=_fmean(rs, 'stem_norm_burnin'),
            stem_norm_end=_fmean(rs, 'stem_norm_end'),
            conv_norm_end=_fmean(rs, 'conv_norm_end'),
            loss_curve=[statistics.fmean(c) for c in zip(
                *(r['loss_curve'] for r in rs))],
            stem_norm_curve=[statistics.fmean(c) for c in zip(
                *(r.get('stem_norm_curve', []) for r in rs))],
            window_grad=spec['kwargs'].get(
                'window_grad', spec['kwargs'].get('compensate', True))
            if spec['norm'] == 'cbn' else None,
            seconds=sum(r['seconds'] for r in rs))
    return summary


#: Comparisons beyond "each run minus BN at its batch" (a minus b).
EXTRA_PAIRS = (
    ('BN b2', 'BN b32'), ('BN b4', 'BN b32'), ('digits BN b2',
                                               'digits BN b32'),
    ('GN b2', 'BN b32'), ('CBN b2 k8', 'BN b32'), ('CBN b4 k4', 'BN b32'),
    ('CBN b2 k8', 'GN b2'), ('CBN-w b2 k8', 'GN b2'),
    ('CBN b4 k4', 'GN b4'),
    ('CBN b2 k8', "CBN authors' backward b2 k8"),
    ('CBN b4 k4', "CBN authors' backward b4 k4"),
    ('CBN b2 k8', 'naive CBN b2 k8'), ('CBN b4 k4', 'naive CBN b4 k4'),
    ('naive + window grad b2 k8', 'CBN b2 k8'),
    ('naive + window grad b4 k4', 'CBN b4 k4'),
    ('CBN-w b2 k8', 'CBN b2 k8'), ('CBN-w b4 k4', 'CBN b4 k4'),
    ('BN early, CBN late b2 k8', 'CBN b2 k8'),
    ('BN early, CBN late b4 k4', 'CBN b4 k4'),
    ('digits CBN b2 k8', 'digits BN b32'),
    ('digits CBN-up b2 k8', 'digits CBN b2 k8'),
    ('digits CBN-up-w b2 k8', 'digits CBN b2 k8'),
    ('digits CBN-up b2 k8', 'digits BN b32'),
    ('digits GN+WS b2', 'digits GN b2'), ('digits GN+WC b2', 'digits GN b2'),
    ('digits MABN b2', 'digits GN b2'),
    ('digits CBN+WS b2 k8', 'digits CBN b2 k8'),
    ('digits CBN-up-w+WS b2 k8', 'digits CBN-up-w b2 k8'),
    ('digits CBN-up-w+WS b2 k8', 'digits GN+WS b2'),
    ('digits CBN-up-w+WS b2 k8', 'digits MABN b2'),
    ('digits CBN+WS b2 k8', 'digits MABN b2'))


def comparisons(summary, specs):
    pairs = [(s['name'], s['paired_bn']) for s in specs
             if s['name'] != s['paired_bn']] + list(EXTRA_PAIRS)
    out = {}
    for a, b in pairs:
        c = compare(summary, a, b)
        if c is not None:
            c['per_seed'] = [x - y for x, y in zip(summary[a]['accs'],
                                                    summary[b]['accs'])]
            out[f'{a} - {b}'] = c
    return out


def tables(summary, specs, checks):
    rows = []
    for spec in specs:
        v = summary[spec['name']]
        c = checks.get(f"{spec['name']} - {spec['paired_bn']}")
        big = checks.get(f"{spec['name']} - BN b32")
        rows.append([
            spec['name'], v['batch'],
            v['window'] if v['norm'] == 'cbn' else '',
            v['burnin'] or '', v['iterations'], f"{v['lr']:.4g}",
            f"**{v['acc_mean']:.2f} ± {v['acc_std']:.2f}**",
            '' if c is None else
            f"{c['diff']:+.2f} ± {c['paired_se']:.2f} "
            f"({c['seeds_a_better']}/{len(v['accs'])})",
            '' if big is None else f"{big['diff']:+.2f} "
            f"({big['seeds_a_better']}/{len(v['accs'])})",
            f"{v['acc_pop_mean']:.2f} ± {v['acc_pop_std']:.2f}",
            f"{v['train_loss_last_tenth']:.3f}",
            f"{v['stem_norm_end']:.2f} ({v['stem_norm_burnin']:.2f})"
            if v['norm'] == 'cbn' else f"{v['stem_norm_end']:.2f}",
            f"{v['seconds']:.0f}"
        ])
    table = markdown_table([
        'run', 'batch', 'k', 'burn-in it', 'iterations', 'lr',
        'test acc % (mean ± std)',
        'Δ vs BN same batch (± paired s.e.; seeds ahead)',
        'Δ vs BN b32 (seeds ahead)', 'acc, population stats',
        'train loss, last tenth', 'stem conv weight norm, end (burn-in end)',
        'train s (all seeds)'
    ], rows)
    check_rows = [[
        k, f"{c['diff']:+.2f}", f"{c['paired_se']:.2f}",
        f"{c['seeds_a_better']}/{c['seeds_b_better']}",
        ' '.join(f'{d:+.1f}' for d in c['per_seed'])
    ] for k, c in checks.items()]
    check_table = markdown_table([
        'a − b', 'Δ acc (points)', 'paired s.e.', 'seeds a ahead/behind',
        'per seed'
    ], check_rows)
    return table, check_table


def noise_table(noise):
    rows = []
    for data, by_batch in noise.items():
        for b, s in by_batch.items():
            rows.append([
                data, b, f"{s['all']['between_image']:.2f}",
                f"{s['all']['mean_noise']:.2f}",
                f"{s['all']['var_noise']:.2f}",
                f"{s['last']['mean_noise']:.2f}",
                f"{s['last']['var_noise']:.2f}"
            ])
    return markdown_table([
        'data', 'batch', 'between-image share of variance',
        'mean noise (σ units)', 'variance noise (rel.)',
        'mean noise, last layer', 'variance noise, last layer'
    ], rows)


def plot(summary, checks, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(13, 9),
                             gridspec_kw=dict(width_ratios=[1, 1.25]))
    (ax, bx), (cx, dx) = axes
    for data, style in (('photos', dict(marker='o', color='tab:blue',
                                        label='BN (photos)')),
                        ('digits', dict(marker='o', color='tab:gray',
                                        linestyle='--',
                                        label='BN (digits control)'))):
        bn = sorted((v['batch'], v['acc_mean'], v['acc_std'])
                    for v in summary.values()
                    if v['norm'] == 'bn' and v['data'] == data)
        if bn:
            b, m, s = zip(*bn)
            ax.errorbar(b, m, yerr=s, capsize=3, **style)
    styles = {
        'GN': dict(marker='s', color='tab:green'),
        'naive CBN': dict(marker='v', color='tab:red'),
        "CBN authors' backward": dict(marker='x', color='tab:gray'),
        'CBN': dict(marker='*', color='tab:purple', markersize=12),
        'CBN-w': dict(marker='P', color='tab:orange'),
        'naive + window grad': dict(marker='^', color='tab:pink'),
        'BN early, CBN late': dict(marker='D', color='tab:brown'),
    }
    offsets = {'GN': 0.88, 'naive CBN': 1.04, "CBN authors' backward": 1.09,
               'CBN': 1.14, 'CBN-w': 1.2, 'naive + window grad': 1.26,
               'BN early, CBN late': 1.32}
    seen = set()
    for name, v in summary.items():
        if v['norm'] == 'bn' or v['data'] != 'photos':
            continue
        key = next(k for k in sorted(styles, key=len, reverse=True)
                   if name.startswith(k))
        st = dict(styles[key])
        if key not in seen:
            st['label'] = key
        seen.add(key)
        ax.errorbar([v['batch'] * offsets[key]], [v['acc_mean']],
                    yerr=[v['acc_std']], linestyle='none', capsize=3, **st)
    ax.set_xscale('log', base=2)
    ax.set_xticks(sorted({v['batch'] for v in summary.values()}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel('batch size (images per iteration)')
    ax.set_ylabel('test accuracy (%), eval mode')
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='center right')
    # paired differences against BN at the same batch, per seed
    keys = [k for k, c in checks.items()
            if c['b'].startswith('BN b') and c['b'] != 'BN b32'
            and not c['a'].startswith('BN b')]
    for i, k in enumerate(keys):
        c = checks[k]
        bx.barh(i, c['diff'], xerr=c['paired_se'], color='tab:purple'
                if c['a'].startswith('CBN') else 'tab:gray', alpha=0.5,
                capsize=3)
        bx.plot(c['per_seed'], [i] * len(c['per_seed']), 'k.', ms=5)
    bx.set_yticks(range(len(keys)))
    bx.set_yticklabels(keys, fontsize=7)
    bx.axvline(0, color='k', lw=0.8)
    bx.invert_yaxis()
    bx.set_xlabel('paired Δ test accuracy vs BN at the same batch '
                  '(points)\ndots: seeds; bars: mean ± paired s.e.')
    bx.grid(axis='x', alpha=0.3)
    # training dynamics at batch 2: loss and stem conv weight norm per tenth
    for name, v in summary.items():
        if v['data'] != 'photos' or v['batch'] != 2:
            continue
        key = next((k for k in sorted(styles, key=len, reverse=True)
                    if name.startswith(k)), None)
        color = styles[key]['color'] if key else (
            'tab:blue' if v['norm'] == 'bn' else 'k')
        tenths = [i + 1 for i in range(len(v['loss_curve']))]
        cx.plot(tenths, v['loss_curve'], color=color, marker='.',
                label=name)
        if v.get('stem_norm_curve'):
            dx.plot(range(len(v['stem_norm_curve'])), v['stem_norm_curve'],
                    color=color, marker='.', label=name)
    cx.set_xlabel('tenth of the schedule')
    cx.set_ylabel('mean training loss (seed mean)')
    cx.set_title('batch 2: training loss', fontsize=9)
    cx.grid(alpha=0.3)
    cx.legend(fontsize=6)
    dx.set_xlabel('tenth of the schedule (0: init)')
    dx.set_ylabel('stem conv weight norm (seed mean)')
    dx.set_title('batch 2: producer weight norm (stem conv)', fontsize=9)
    dx.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    plt.close(fig)


#: The arguments that change what a run computes.
RUN_ARGS = ('epochs', 'base_lr', 'weight_decay', 'widths', 'blocks', 'short',
            'grid', 'crop', 'n_train', 'n_test', 'n_photos', 'data_seed',
            'threads', 'quick')


def settings_key(args, names=RUN_ARGS):
    """A hash of the arguments ``names`` (those that change a run)."""
    text = json.dumps({k: getattr(args, k) for k in names},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _name_and_seed(entry):
    return entry['name'], entry['run']['seed']


def load_finished(path, args, names=RUN_ARGS, key_of=_name_and_seed):
    """``{key_of(entry): run}`` (default key: ``(name, seed)``) of the runs
    in ``path`` made with the same settings (a run is deterministic for
    its settings, seed and thread count)."""
    key, out = settings_key(args, names), {}
    if osp.isfile(path):
        with open(path) as f:
            for line in f:
                entry = json.loads(line)
                if entry['settings'] == key:
                    out[key_of(entry)] = entry['run']
    return out


def append_finished(path, args, name, run):
    with open(path, 'a') as f:
        f.write(json.dumps(dict(settings=settings_key(args), name=name,
                                run=run)) + '\n')


def add_task_arguments(parser):
    """The task's and the training schedule's arguments (shared with
    ``upstream_study.py``)."""
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--weight-decay', type=float, default=5e-4)
    parser.add_argument('--widths', type=int, nargs='+',
                        default=[16, 32, 64, 128])
    parser.add_argument('--blocks', type=int, nargs='+',
                        default=[1, 1, 1, 1])
    parser.add_argument('--short', type=int, default=64)
    parser.add_argument('--grid', type=int, default=2)
    parser.add_argument('--crop', type=int, default=16)
    parser.add_argument('--n-train', type=int, default=20)
    parser.add_argument('--n-test', type=int, default=10)
    parser.add_argument('--n-photos', type=int, default=None,
                        help='use only the first N photographs')
    parser.add_argument('--data-seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=1)


def main(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument('--seeds', type=int, nargs='+',
                        default=[0, 1, 2, 3, 4])
    parser.add_argument('--base-lr', type=float, default=0.1,
                        help='learning rate at batch 32 (linear scaling)')
    add_task_arguments(parser)
    parser.add_argument('--noise-batches', type=int, default=2000)
    parser.add_argument('--runs', nargs='+', default=None,
                        help='only the runs with these names')
    parser.add_argument('--work-dir', help='where finished runs are kept '
                        '(default: work_dirs/small_batch_photos[_quick])')
    parser.add_argument('--replot', metavar='JSON',
                        help='only redraw the plot of an earlier run')
    args = parser.parse_args(argv)
    args.quick_digits = 240
    if args.replot:
        with open(args.replot) as f:
            old = json.load(f)
        plot(old['summary'], old['checks'],
             osp.splitext(args.replot)[0] + '.png', old['plot_title'])
        return old
    if args.quick:
        args.seeds, args.epochs = [0, 1], 1
        args.n_photos, args.n_train, args.n_test = 10, 6, 4
        args.widths, args.noise_batches = [8, 16, 32, 64], 200
    torch.set_num_threads(args.threads)
    total_timer = Timer()
    specs = run_specs(args.quick)
    if args.runs:
        specs = [s for s in specs if s['name'] in args.runs]
    datasets = {d: load_data(d, args) for d in {s['data'] for s in specs}}
    results = {s['name']: [] for s in specs}
    b32_models = {}
    tag = '_quick' if args.quick else ''
    work_dir = args.work_dir or osp.join(ROOT, 'work_dirs',
                                         f'small_batch_photos{tag}')
    os.makedirs(work_dir, exist_ok=True)
    finished = load_finished(osp.join(work_dir, 'runs.jsonl'), args)
    for seed in args.seeds:
        for spec in specs:
            keep = seed == args.seeds[0] and spec['name'] in ('BN b32',
                                                              'digits BN b32')
            r = finished.get((spec['name'], seed))
            if r is not None and not keep:
                print(f"seed {seed} {spec['name']:<25} reused from "
                      f"{osp.relpath(work_dir, ROOT)}/runs.jsonl")
                results[spec['name']].append(r)
                continue
            r = train_one(spec, seed, datasets[spec['data']], args, keep)
            if keep:
                b32_models[spec['data']] = r.pop('model')
            r['seed'] = seed
            results[spec['name']].append(r)
            append_finished(osp.join(work_dir, 'runs.jsonl'), args,
                            spec['name'], r)
            print(f"seed {seed} {spec['name']:<25} acc {r['test_acc']:6.2f}"
                  f" (pop {r['test_acc_population_stats']:6.2f})"
                  f"  loss {r['train_loss_last_epoch']:.3f}"
                  f"  {r['iterations']} it  {r['seconds']:.1f}s", flush=True)
    summary = summarize(results, specs)
    checks = comparisons(summary, specs)
    table, check_table = tables(summary, specs, checks)
    noise = measure(datasets, b32_models, args)
    ntable = noise_table(noise)
    config = dict(
        data={k: v['note'] for k, v in datasets.items()},
        train_images={k: len(v['x_tr']) for k, v in datasets.items()},
        test_images={k: len(v['x_te']) for k, v in datasets.items()},
        classes={k: v['classes'] for k, v in datasets.items()},
        model=dict(type='SmallResNet (BasicBlocks)', widths=args.widths,
                   blocks=args.blocks),
        epochs=args.epochs, seeds=args.seeds,
        optimizer='SGD momentum 0.9, weight decay on conv/fc weights',
        base_lr_at_batch_32=args.base_lr,
        lr_rule='lr = base_lr * batch / 32 (linear scaling), cosine to 0',
        weight_decay=args.weight_decay,
        augmentation='random horizontal flip',
        burnin='CBN burn-in = round(fraction * total iterations)',
        evaluation='eval mode (running statistics), top-1 on the test crops',
        noise='batch_noise(): BN b32 network of the first seed, eval mode, '
        f'{args.noise_batches} random batches',
        gn_groups=8, quick=args.quick)
    title = (f"photo regions ({config['classes'].get('photos')} classes), "
             f"ResNet {args.widths}, {args.epochs} epochs, "
             f"{len(args.seeds)} seeds (mean ± std)")
    print()
    for k, v in config['data'].items():
        print(f'{k}: {v}')
    print(table)
    print()
    print(check_table)
    print()
    print(ntable)
    total = total_timer()
    print(f'\ntotal time {total:.0f} s wall ({torch.get_num_threads()} '
          'torch thread(s))')
    out = dict(benchmark='small_batch_photos', machine=machine_info(),
               config=config, summary=summary, checks=checks, noise=noise,
               runs=results, total_seconds=total, table_markdown=table,
               checks_markdown=check_table, noise_markdown=ntable,
               plot_title=title)
    write_json(osp.join(args.out, f'small_batch_photos{tag}.json'), out)
    plot(summary, checks, osp.join(args.out, f'small_batch_photos{tag}.png'),
         title)
    return out


if __name__ == '__main__':
    main()
