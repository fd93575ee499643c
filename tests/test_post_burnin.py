# Copyright (c) mmcbn contributors. All rights reserved.
"""After burn-in, in real settings: what the CBN layers of a model trained by
mmengine's Runner normalize with equals the float64 reference.

The runs are recorded with forward hooks: every producing conv's input and
parameters at each call, and every CBN layer's input, affine parameters and
output at the iterations checked. The reference window statistics are then
computed independently from the recordings (``reference_cbn.py``: the
producer re-run at the recorded parameters in float64, the Taylor terms by
forward-mode autograd, the note's window average) and the reference output
is compared with the layer's output (float32 tolerances).

- The demo Mask R-CNN (ResNet-18 FPN, CBN in backbone, FPN and both RoI
  heads, window 4, burn-in 1 epoch converted by CBNHook) on the synthetic
  demo data at 64 px, 2 epochs of 4 iterations: burn-in at iteration 3
  (window 1), the full window from 4 (entries recorded in burn-in) and at 7.
- The tiny model in 2 gloo processes under DDP through the Runner: SyncCBN
  against the window statistics of the gathered batch, CBN against each
  process's own.
"""
import contextlib
import os
import os.path as osp
from collections import defaultdict

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from torch import nn

from dist_utils import run_and_load
from mmcbn import binding_report, cbn_layers
from reference_cbn import (compensated_moments, module_apply, moments,
                           normalize, window_average)
from script_utils import load_tool

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


@contextlib.contextmanager
def isolated_runner_globals():
    """Forget the loggers, message hubs and visualizers a runner creates in
    this process, so that later tests do not reuse them."""
    from mmengine.utils import ManagerMixin

    def classes(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from classes(sub)

    before = {cls: set(cls._instance_dict) for cls in classes(ManagerMixin)}
    try:
        yield
    finally:
        for cls in classes(ManagerMixin):
            for name in set(cls._instance_dict) - before.get(cls, set()):
                instance = cls._instance_dict.pop(name)
                for handler in getattr(instance, 'handlers', []):
                    handler.close()


class Recorder(Hook):
    """Forward hooks recording producer calls and CBN calls by iteration.

    ``convs[name][iteration]``: list of (input, {param: value}) per call;
    ``norms[name][iteration]``: list of (input, weight, bias, output).
    """

    priority = 'VERY_HIGH'

    def __init__(self, model, norm_iterations):
        self.iteration = -1
        self.norm_iterations = set(norm_iterations)
        self.convs = defaultdict(lambda: defaultdict(list))
        self.norms = defaultdict(lambda: defaultdict(list))
        norms = {id(m) for _, m in cbn_layers(model)}
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                   nn.Linear)):
                module.register_forward_pre_hook(self._conv_hook(name))
            elif id(module) in norms:
                module.register_forward_hook(self._norm_hook(name))

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.iteration = runner.iter

    def _conv_hook(self, name):

        def hook(module, args):
            if not module.training or self.iteration < 0:
                return
            params = {
                n: p.detach().clone()
                for n, p in module.named_parameters() if p.requires_grad
            }
            self.convs[name][self.iteration].append(
                (args[0].detach().clone(), params))

        return hook

    def _norm_hook(self, name):

        def hook(module, args, output):
            if not module.training or \
                    self.iteration not in self.norm_iterations:
                return
            affine = [None if p is None else p.detach().clone()
                      for p in (module.weight, module.bias)]
            self.norms[name][self.iteration].append(
                (args[0].detach().clone(), *affine, output.detach().clone()))

        return hook


def reference_output(producer, calls, t, window, x, weight, bias, eps,
                     compensate=True, current=None):
    """The note's CBN output for ``x`` at iteration ``t`` (call position
    0) from the producer's recorded calls ``{iteration: [(input,
    params)]}``: the current batch's statistics (of ``current``, default
    ``x``; the gathered batch for SyncCBN) and the entries of iterations
    ``t - window + 1 .. t - 1`` compensated to the parameters of ``t``."""
    apply = module_apply(producer)
    now = {k: v.double() for k, v in calls[t][0][1].items()}
    mu, nu = moments((x if current is None else current).double())
    mus, nus = [mu], [nu]
    for s in range(t - window + 1, t):
        if not calls.get(s) or calls[s][0][0].shape[0] == 0:
            continue  # no entry (e.g. an RoI head without RoIs)
        inp, then = calls[s][0]
        m, n = compensated_moments(apply, inp.double(),
                                   {k: v.double() for k, v in then.items()},
                                   now, compensate)
        mus.append(m)
        nus.append(n)
    mean, var = window_average(mus, nus)
    return normalize(x.double(), mean, var, eps, weight.double(),
                     bias.double())


def demo_config(data_root, work_dir):
    cfg = Config.fromfile(
        osp.join(REPO, 'configs/demo/mask-rcnn_r18_fpn_cbn_demo.py'))
    cfg.work_dir = work_dir
    loader = cfg.train_dataloader
    loader.num_workers = 0
    loader.dataset.data_root = data_root
    for step in loader.dataset.pipeline:
        if step.type == 'Resize':
            step.scale = (64, 64)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.test_dataloader = cfg.test_cfg = cfg.test_evaluator = None
    cfg.train_cfg = dict(by_epoch=True, max_epochs=2, val_interval=100)
    # a constant learning rate: the weights move from the first iteration
    # on, so the compensation is far from negligible after burn-in
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger.interval = 4
    return cfg


#: Largest output difference allowed (float32 statistics; measured: 2e-6).
TOLERANCE = 5e-5
CHECKED = (3, 4, 7)  # last burn-in iteration, first after it, a later one


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    from mmengine.runner import Runner
    root = tmp_path_factory.mktemp('post_burnin_demo')
    load_tool('make_demo_data').generate(
        str(root / 'data'), seed=0, num_train=8, num_val=2, size=64,
        verbose=False)
    cfg = demo_config(str(root / 'data' / 'coco') + '/', str(root / 'work'))
    with isolated_runner_globals():
        runner = Runner.from_cfg(cfg)
        recorder = Recorder(runner.model, CHECKED)
        runner.register_hook(recorder)
        runner.train()
        report = binding_report(runner.model)
    return runner.model, recorder, report


def test_demo_mask_rcnn_after_burnin_matches_reference(demo_run):
    model, recorder, report = demo_run
    modules = dict(model.named_modules())
    layers = dict(cbn_layers(model))
    ran = {n: v for n, v in report.items() if v != ['not run']}
    assert len(ran) == 36  # 20 backbone, 8 FPN, 4 box head, 4 mask head
    groups = {n.split('.')[0] for n in ran}
    assert {'backbone', 'neck', 'roi_head'} <= groups
    assert any('mask_head' in n for n in ran)
    assert all(len(v) == 1 and not v[0].startswith(('unbound', 'frozen'))
               for v in ran.values()), ran
    burnin = layers['backbone.layer1.0.bn1'].burnin_iters
    assert burnin == 4  # 1 epoch of 8 images, 2 per iteration
    errors, naive_gaps, checked = {}, {}, 0
    for name, producers in ran.items():
        layer = layers[name]
        calls = recorder.convs[producers[0]]
        for t in CHECKED:
            (x, weight, bias, y), = recorder.norms[name][t]
            if x.numel() == 0:
                continue
            window = layer.window if t >= burnin else 1
            ref = reference_output(modules[producers[0]], calls, t, window,
                                   x, weight, bias, layer.eps)
            errors[(name, t)] = (y.double() - ref).abs().max().item()
            if t >= burnin:
                naive = reference_output(modules[producers[0]], calls, t,
                                         window, x, weight, bias, layer.eps,
                                         compensate=False)
                naive_gaps[(name, t)] = (naive - ref).abs().max().item()
            checked += 1
    assert checked >= 3 * 34
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, (worst, errors[worst])
    # the check is not vacuous: the window and its compensation matter
    # here, far beyond the tolerance, in most layers after burn-in
    big = [k for k, gap in naive_gaps.items() if gap > 200 * TOLERANCE]
    assert len(big) > len(naive_gaps) // 2, sorted(naive_gaps.values())[:10]


# ------------------------------------------------------ 2 gloo processes
DIST_ITERS, DIST_WINDOW, DIST_BURNIN = 7, 3, 2


def dist_config(work_dir, norm_type):
    return dict(
        model=dict(
            type='TinyCBNNet',
            norm_cfg=dict(type=norm_type, window=DIST_WINDOW,
                          burnin=DIST_BURNIN)),
        work_dir=work_dir,
        experiment_name=norm_type,
        train_dataloader=dict(
            dataset=dict(type='RandomImages', n=2 * 2 * DIST_ITERS),
            batch_size=2,
            num_workers=0,
            sampler=dict(type='DefaultSampler', shuffle=True),
            collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=DIST_ITERS),
        optim_wrapper=dict(
            optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
        default_hooks=dict(
            checkpoint=None, logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[dict(type='CBNHook')],
        launcher='pytorch',
        env_cfg=dict(dist_cfg=dict(backend='gloo')),
        model_wrapper_cfg=dict(
            type='MMDistributedDataParallel',
            broadcast_buffers=False,
            device_ids=None),
        randomness=dict(seed=0),
        default_scope=None)


def _dist_worker(rank, world, out_dir):
    """Train the tiny model with SyncCBN, then with CBN, through the
    Runner (DDP over gloo); save the recordings of this process."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    import tiny_cbn  # noqa: F401 (registers the model and dataset)
    from mmengine.runner import Runner

    import mmcbn  # noqa: F401
    results = {}
    for norm_type in ('SyncCBN', 'CBN'):
        runner = Runner.from_cfg(
            dist_config(osp.join(out_dir, norm_type), norm_type))
        model = runner.model.module
        recorder = Recorder(model, range(DIST_ITERS))
        runner.register_hook(recorder)
        runner.train()
        results[norm_type] = dict(
            convs={k: dict(v) for k, v in recorder.convs.items()},
            norms={k: dict(v) for k, v in recorder.norms.items()},
            report=binding_report(model),
            types=sorted({type(m).__name__ for _, m in cbn_layers(model)}))
    torch.save(results, osp.join(out_dir, f'rank{rank}.pt'))


@pytest.fixture(scope='module')
def dist_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp('post_burnin_dist')
    return run_and_load(_dist_worker, out)


def gathered_calls(ranks, producer):
    """A producer's calls of both processes, inputs concatenated."""
    out = {}
    for it in ranks[0]['convs'][producer]:
        (inp0, params0), = ranks[0]['convs'][producer][it]
        (inp1, params1), = ranks[1]['convs'][producer][it]
        for name, value in params0.items():  # DDP: identical parameters
            assert torch.equal(value, params1[name])
        out[it] = [(torch.cat([inp0, inp1]), params0)]
    return out


@pytest.mark.parametrize('norm_type', ['SyncCBN', 'CBN'])
def test_two_gloo_processes_after_burnin_match_reference(
        dist_runs, norm_type):
    from tiny_cbn import TinyCBNNet
    ranks = [r[norm_type] for r in dist_runs]
    assert ranks[0]['types'] == [f'{norm_type}2d']
    report = ranks[0]['report']
    assert report == {'conv1.bn': ['conv1.conv'], 'conv2.bn': ['conv2.conv']}
    shapes = TinyCBNNet(dict(type='BN'))  # producer modules (shapes only)
    modules = dict(shapes.named_modules())
    errors, gaps = {}, {}
    for name, (producer, ) in report.items():
        per_rank = [r['convs'][producer] for r in ranks]
        gathered = gathered_calls(ranks, producer)
        for t in range(DIST_ITERS):
            window = DIST_WINDOW if t >= DIST_BURNIN else 1
            xs = [r['norms'][name][t][0][0] for r in ranks]
            for rank, r in enumerate(ranks):
                (x, weight, bias, y), = r['norms'][name][t]
                if norm_type == 'SyncCBN':
                    calls, current = gathered, torch.cat(xs)
                else:
                    calls, current = per_rank[rank], None
                ref = reference_output(modules[producer], calls, t, window,
                                       x, weight, bias, 1e-5,
                                       current=current)
                errors[(name, t, rank)] = (y.double() - ref).abs().max()
                if t >= DIST_BURNIN:
                    # not vacuous: the other kind of statistics differs
                    other = reference_output(
                        modules[producer],
                        per_rank[rank] if norm_type == 'SyncCBN' else
                        gathered, t, window, x, weight, bias, 1e-5,
                        current=None if norm_type == 'SyncCBN' else
                        torch.cat(xs))
                    gaps[(name, t, rank)] = (other - ref).abs().max()
    assert len(errors) == 2 * DIST_ITERS * 2
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, (worst, errors[worst])
    assert min(gaps.values()) > 200 * TOLERANCE
