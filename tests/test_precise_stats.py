# Copyright (c) mmcbn contributors. All rights reserved.
"""Exact re-estimation of the running statistics (mmcbn.precise_stats) and
PreciseStatsHook in an mmengine runner.

- The pooled statistics equal the float64 mean and unbiased variance of
  each layer's inputs over all batches (captured by forward pre-hooks), not
  the average of per-batch variances; the layers after a BN layer see its
  input normalized with the batch's (or the running) statistics.
- Nothing else changes: CBN windows, iterations and counters, other
  buffers, modules' modes, the global random states; frozen (eval-mode)
  layers are left alone; a second-moment-only layer (MABN) pools E[x^2].
- Two gloo processes with half the batches each give the statistics of
  one process with all of them.
- The hook re-estimates at its interval and at the end, before the
  checkpoint is saved, from a dataloader of its own: training sees the
  same batches and random numbers as without it.
"""
import copy
import os.path as osp
import random
from itertools import islice

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.hooks import Hook
from mmengine.registry import DATASETS, HOOKS
from mmengine.runner import Runner
from torch import nn

import mmcbn.hooks.precise_stats_hook as hook_module
from dist_utils import run_and_load
from mmcbn import (CBN2d, PreciseStatsHook, cbn_layers, recompute_statistics,
                   set_cbn_iteration)
from mmcbn.hooks.precise_stats_hook import TIME_KEY, train_forward
from mmcbn.precise_stats import preserved_rng
from mmcbn.resume import collect_window_state
from tiny_cbn import RandomImages, TinyCBNNet, TwoBlockNet, tiny_config

#: float32 rounding of the sums and of the buffers.
TOL = dict(rtol=1e-6, atol=1e-7)


class Net(nn.Module):
    """conv -> norm -> relu -> (dropout) -> conv -> BN."""

    def __init__(self, norm1=None, dropout=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = norm1 if norm1 is not None else nn.BatchNorm2d(4)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(5)

    def forward(self, x):
        return self.bn2(self.conv2(self.drop(torch.relu(self.bn1(
            self.conv1(x))))))


def make_net(**kwargs):
    torch.manual_seed(0)
    net = Net(**kwargs)
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            # running statistics far from the batches' (as early in training)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.2, 3)
    return net


def make_batches(count=5, size=2, offset=1.0, seed=1):
    """Batches of 2 whose means differ (so pooled != average of per-batch
    variances)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 6, 6, generator=gen) + offset * i
            for i in range(count)]


def capture(*layers):
    """Each layer's inputs, as the pass gives them (forward pre-hooks)."""
    seen = {layer: [] for layer in layers}
    handles = [
        layer.register_forward_pre_hook(
            lambda m, args: seen[m].append(args[0].detach().clone()))
        for layer in layers
    ]
    return seen, handles


def pooled(xs):
    """float64 mean and unbiased variance per channel over all batches."""
    x = torch.cat(xs).double().transpose(0, 1).flatten(1)
    return x.mean(1), x.var(1, unbiased=True)


def assert_close(actual, expected, **tol):
    torch.testing.assert_close(actual.double(), expected.double(),
                               **(tol or TOL))


def run_pass(net, batches, **kwargs):
    seen, handles = capture(net.bn1, net.bn2)
    try:
        report = recompute_statistics(net, batches, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return report, seen[net.bn1], seen[net.bn2]


# ------------------------------------------------------------- exactness
def test_pooled_statistics_are_exact_not_averaged():
    net = make_net()
    batches = make_batches()
    net.eval()
    report, in1, in2 = run_pass(net, batches)
    assert report['num_batches'] == report['total_batches'] == 5
    assert report['updated'] == ['bn1', 'bn2']
    assert report['empty'] == report['nonfinite'] == []
    assert report['seconds'] > 0
    assert len(in1) == len(in2) == 5
    for bn, xs in ((net.bn1, in1), (net.bn2, in2)):
        mean, var = pooled(xs)
        assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32
        assert_close(bn.running_mean, mean)
        assert_close(bn.running_var, var)
        # not the biased variance ...
        n = sum(x.numel() // x.shape[1] for x in xs)
        assert not torch.allclose(bn.running_var.double(), var * (n - 1) / n,
                                  **TOL)
        # ... nor detectron2's average of per-batch (unbiased) variances,
        # which misses the spread of the batch means
        per_batch = torch.stack([pooled([x])[1] for x in xs]).mean(0)
        assert not torch.allclose(bn.running_var.double(), per_batch,
                                  rtol=1e-4, atol=0)
        assert int(bn.num_batches_tracked) == 0
    # what bn2 saw: bn1's input normalized with each batch's statistics
    for b, x2 in zip(batches, in2):
        y1 = F.batch_norm(net.conv1(b), None, None, net.bn1.weight,
                          net.bn1.bias, True, 0.0, net.bn1.eps)
        assert_close(x2, net.conv2(torch.relu(y1)), rtol=1e-5, atol=1e-5)
    assert not net.training and not net.bn1.training


@pytest.mark.parametrize('normalize', ['batch', 'running'])
def test_normalize_decides_what_the_next_layer_sees(normalize):
    net = make_net()
    running = (net.bn1.running_mean.clone(), net.bn1.running_var.clone())
    batches = make_batches()
    with torch.no_grad():
        if normalize == 'batch':
            expected = [
                net.conv2(torch.relu(F.batch_norm(
                    net.conv1(b), None, None, net.bn1.weight, net.bn1.bias,
                    True, 0.0, net.bn1.eps))) for b in batches]
        else:  # the statistics before the pass (eval behaviour)
            expected = [
                net.conv2(torch.relu(F.batch_norm(
                    net.conv1(b), *running, net.bn1.weight, net.bn1.bias,
                    False, 0.0, net.bn1.eps))) for b in batches]
    _, in1, in2 = run_pass(net, batches, normalize=normalize)
    for got, want in zip(in2, expected):
        assert_close(got, want, rtol=1e-5, atol=1e-5)
    for bn, xs in ((net.bn1, in1), (net.bn2, in2)):
        mean, var = pooled(xs)
        assert_close(bn.running_mean, mean)
        assert_close(bn.running_var, var)


def test_batch_and_running_give_different_downstream_statistics():
    stats = {}
    for normalize in ('batch', 'running'):
        net = make_net()
        recompute_statistics(net, make_batches(), normalize=normalize)
        stats[normalize] = [t.clone() for t in (
            net.bn1.running_mean, net.bn1.running_var,
            net.bn2.running_mean, net.bn2.running_var)]
    batch, run = stats['batch'], stats['running']
    # bn1 sees the same inputs either way; bn2 does not
    assert torch.equal(batch[0], run[0]) and torch.equal(batch[1], run[1])
    assert not torch.allclose(batch[2], run[2], rtol=1e-3)
    assert not torch.allclose(batch[3], run[3], rtol=1e-3)


def test_num_batches_and_layers_select_what_is_used():
    net = make_net()
    before = copy.deepcopy(net.state_dict())
    batches = make_batches()
    report, in1, in2 = run_pass(net, batches, num_batches=3, layers=['bn2'],
                                normalize='running')
    assert report['num_batches'] == 3 and report['updated'] == ['bn2']
    assert len(in1) == 3
    for key in ('bn1.running_mean', 'bn1.running_var'):
        assert torch.equal(net.state_dict()[key], before[key])
    assert not torch.equal(net.bn2.running_var, before['bn2.running_var'])
    # bn1, left out, still normalized as asked (not its training forward)
    bn1 = net.bn1
    for b, x2 in zip(batches, in2):
        y1 = F.batch_norm(net.conv1(b), bn1.running_mean, bn1.running_var,
                          bn1.weight, bn1.bias, False, 0.0, bn1.eps)
        assert_close(x2, net.conv2(torch.relu(y1)), rtol=1e-5, atol=1e-5)


class WithUnusedBranch(Net):

    def __init__(self):
        super().__init__()
        self.aux = nn.BatchNorm2d(5)  # never called

    def forward(self, x):
        return super().forward(x)


def test_a_layer_that_saw_no_sample_keeps_its_statistics():
    torch.manual_seed(0)
    net = WithUnusedBranch()
    with torch.no_grad():
        net.aux.running_mean.fill_(0.25)
    report = recompute_statistics(net, make_batches(2))
    assert report['updated'] == ['bn1', 'bn2']
    assert report['empty'] == ['aux']
    assert torch.equal(net.aux.running_mean, torch.full((5, ), 0.25))
    assert torch.equal(net.aux.running_var, torch.ones(5))


def test_one_value_per_channel_gives_no_variance():
    # one sample of a BatchNorm1d: no unbiased variance (BN itself refuses
    # it in training); a second-moment layer can use it
    class SecondMoment1d(nn.BatchNorm1d):
        second_moment_only = True

    net = nn.Sequential(nn.BatchNorm1d(3), SecondMoment1d(3))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    report = recompute_statistics(net, [x])
    assert report['empty'] == ['0'] and report['updated'] == ['1']
    assert torch.equal(net[0].running_var, torch.ones(3))
    # (what the second layer saw: the first normalized with the batch's own
    # statistics, i.e. its bias, 0)
    assert torch.equal(net[1].running_var, torch.zeros(3))


class CountsCalls(nn.Module):
    """Not a _BatchNorm: updates a buffer in its training forward."""

    def __init__(self):
        super().__init__()
        self.register_buffer('calls', torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.calls += 1
        return x


def test_other_buffers_are_put_back():
    net = make_net()
    net.counter = CountsCalls()
    net.conv1 = nn.Sequential(net.conv1, net.counter)
    buf = net.counter.calls
    report = recompute_statistics(net, make_batches())
    assert report['updated'] == ['bn1', 'bn2']
    assert net.counter.calls is buf and int(buf) == 0


def test_non_finite_statistics_are_not_written():
    net = make_net()
    before = copy.deepcopy(net.state_dict())
    batches = make_batches(3)
    batches[1][0, 0, 0, 0] = float('inf')
    report = recompute_statistics(net, batches)
    assert report['updated'] == [] and report['nonfinite'] == ['bn1', 'bn2']
    assert_same(net.state_dict(), before)


def test_statistics_stay_float32_under_autocast():
    net = make_net()
    batches = make_batches()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, in1, in2 = run_pass(net, batches)
    assert in1[0].dtype == torch.bfloat16  # the conv ran in bfloat16
    for bn, xs in ((net.bn1, in1), (net.bn2, in2)):
        assert bn.running_var.dtype == torch.float32
        mean, var = pooled(xs)
        assert_close(bn.running_mean, mean)
        assert_close(bn.running_var, var)


# ------------------------------------------------ nothing else changes
def cbn_state(layer):
    """Everything a CBN layer holds besides its parameters and buffers."""
    def clone(v):
        return v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)

    return dict(
        iteration=layer.iteration,
        state={k: clone(v) for k, v in vars(layer).items()
               if k in ('_iteration', '_call_position', '_external_iteration',
                        '_backwards', '_flag_base', '_flags', '_health',
                        '_warned', '_instance_id', '_rekey', 'bindings')},
        last_call=layer._last_call,
        windows=[w.state_dict() for w in layer._windows])


def assert_same(a, b, path='state'):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f'{path}.{k}')
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{path}[{i}]')
    else:
        assert a == b, path


def cbn_net():
    torch.manual_seed(0)
    return TwoBlockNet(lambda c: CBN2d(c, window=3))


def train(net, opt, batches, start):
    outs = []
    net.train()
    for i, b in enumerate(batches):
        set_cbn_iteration(net, start + i)
        y = net(b)
        outs.append(y.detach().clone())
        opt.zero_grad()
        (y.square().mean() + y.mean()).backward()
        opt.step()
    return outs


RUNNING = ('running_mean', 'running_var')


def test_cbn_layers_change_only_their_running_statistics():
    net, twin = cbn_net(), cbn_net()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
            for m in (net, twin)]
    first, later = make_batches(3, seed=2), make_batches(3, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(
        train(net, opts[0], first, 0), train(twin, opts[1], first, 0)))
    layers = [layer for _, layer in cbn_layers(net)]
    assert all(len(layer._windows[0]) > 0 for layer in layers)
    state = copy.deepcopy(net.state_dict())
    windows = collect_window_state(net)
    held = [cbn_state(layer) for layer in layers]

    report = recompute_statistics(net, make_batches())
    assert report['updated'] == ['n1', 'n2']
    after = net.state_dict()
    changed = {k for k in state if not torch.equal(state[k], after[k])}
    assert changed == {f'{n}.{b}' for n in ('n1', 'n2') for b in RUNNING}
    assert_same(collect_window_state(net), windows, 'windows')
    for layer, before in zip(layers, held):
        assert_same(cbn_state(layer), before, layer.cbn_name or 'layer')
        assert 'forward' not in vars(layer)

    # the twin gets the same running statistics by hand; everything after
    # is the same, in training and in eval
    with torch.no_grad():
        for (_, a), (_, b) in zip(cbn_layers(net), cbn_layers(twin)):
            for name in RUNNING:
                getattr(b, name).copy_(getattr(a, name))
    assert all(torch.equal(a, b) for a, b in zip(
        train(net, opts[0], later, 3), train(twin, opts[1], later, 3)))
    net.eval()
    twin.eval()
    with torch.no_grad():
        assert torch.equal(net(later[0]), twin(later[0]))
    assert_same(net.state_dict(), twin.state_dict(), 'state_dict')


def test_random_states_are_untouched():
    def forward(model, batch):
        random.random(), np.random.rand()  # (a data pipeline would)
        return model(batch)

    def draws():
        return (torch.rand(4), random.random(), float(np.random.rand()))

    def seed_all(seed):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

    seed_all(7)
    expected = draws()
    net = make_net(dropout=0.5)
    batches = make_batches()
    seed_all(7)
    _, _, in2 = run_pass(net, batches, forward=forward)
    got = draws()
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    # (the dropout was active in the pass: it drew random numbers)
    with torch.no_grad():
        undropped = net.conv2(torch.relu(F.batch_norm(
            net.conv1(batches[0]), None, None, net.bn1.weight, net.bn1.bias,
            True, 0.0, net.bn1.eps)))
    assert not torch.allclose(in2[0], undropped, rtol=1e-3, atol=1e-3)


class FrozenFirstNorm(Net):
    """bn1 stays in eval mode under train(), as mmdet's norm_eval does."""

    def train(self, mode=True):
        super().train(mode)
        if mode:
            self.bn1.eval()
        return self


def test_frozen_layers_are_left_alone_and_modes_restored():
    torch.manual_seed(0)
    net = FrozenFirstNorm(dropout=0.2)
    net.train()
    net.drop.eval()  # a module's own mode is kept as it was
    modes = [m.training for m in net.modules()]
    before = copy.deepcopy(net.state_dict())
    report = recompute_statistics(net, make_batches())
    assert report['updated'] == ['bn2']
    assert [m.training for m in net.modules()] == modes
    after = net.state_dict()
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same == (key not in ('bn2.running_mean', 'bn2.running_var')), \
            key

    # an eval-mode model gets re-estimated too (model.train() decides)
    net.eval()
    report = recompute_statistics(net, make_batches())
    assert report['updated'] == ['bn2'] and not net.training
    assert all(not m.training for m in net.modules())


def test_a_failing_batch_restores_everything():
    net = make_net()
    net.train()
    net.bn2.eval()
    modes = [m.training for m in net.modules()]
    before = copy.deepcopy(net.state_dict())

    def forward(model, batch):
        if batch is None:
            raise RuntimeError('bad batch')
        return model(batch)

    with pytest.raises(RuntimeError, match='bad batch'):
        recompute_statistics(net, make_batches(2) + [None], forward=forward)
    assert [m.training for m in net.modules()] == modes
    assert_same(net.state_dict(), before)
    assert 'forward' not in vars(net.bn1) and 'forward' not in vars(net.bn2)
    # a forward set on the instance before is put back
    own = net.bn1.forward
    net.bn1.forward = own
    recompute_statistics(net, make_batches(2))
    assert vars(net.bn1)['forward'] is own


class SecondMomentNorm(nn.BatchNorm2d):
    """A stand-in for MABN: normalizes with E[x^2], no mean."""

    second_moment_only = True

    def forward(self, x):
        return x / (self.running_var + self.eps).sqrt()[:, None, None] * \
            self.weight[:, None, None] + self.bias[:, None, None]


@pytest.mark.parametrize('normalize', ['batch', 'running'])
def test_second_moment_layer_pools_the_second_moment(normalize):
    net = make_net(norm1=SecondMomentNorm(4))
    with torch.no_grad():
        net.bn1.running_mean.fill_(0.5)  # must stay as it is
        net.bn1.running_var.uniform_(0.5, 2)
    var_before = net.bn1.running_var.clone()
    batches = make_batches()
    report, in1, in2 = run_pass(net, batches, normalize=normalize)
    assert report['updated'] == ['bn1', 'bn2']
    x = torch.cat(in1).double()
    assert_close(net.bn1.running_var, x.square().mean((0, 2, 3)))
    assert torch.equal(net.bn1.running_mean, torch.full((4, ), 0.5))
    w, b = (p.detach().double()[:, None, None]
            for p in (net.bn1.weight, net.bn1.bias))
    for x1, x2 in zip(in1, in2):
        x1 = x1.double()
        nu = x1.square().mean((0, 2, 3)) if normalize == 'batch' else \
            var_before.double()
        y1 = x1 / (nu[:, None, None] + net.bn1.eps).sqrt() * w + b
        with torch.no_grad():
            assert_close(x2, net.conv2(torch.relu(y1.float())), rtol=1e-5,
                         atol=1e-5)
    mean, var = pooled(in2)
    assert_close(net.bn2.running_mean, mean)
    assert_close(net.bn2.running_var, var)


def test_mabn_layer_pools_the_second_moment_and_keeps_its_state():
    mabn = pytest.importorskip('mmcbn.mabn')  # (skipped where not built)
    net = make_net(norm1=mabn.MABN2d(4, buffer_size=2, sma_warmup=1))
    with torch.no_grad():
        net.bn1.running_mean.zero_()
        net.train()
        for b in make_batches(2, seed=4):
            net(b)  # two training steps: histories, counters
    state = copy.deepcopy(net.bn1.state_dict())
    steps = net.bn1._steps
    _, in1, _ = run_pass(net, make_batches())
    assert_close(net.bn1.running_var,
                 torch.cat(in1).double().square().mean((0, 2, 3)))
    assert net.bn1._steps == steps
    for key, value in net.bn1.state_dict().items():
        if key != 'running_var':
            assert torch.equal(value, state[key]), key


# ------------------------------------------------------------ processes
def _two_processes(rank, world_size, out_dir):
    net = make_net()
    batches = make_batches(6)
    half = len(batches) // world_size
    report = recompute_statistics(net,
                                  batches[rank * half:(rank + 1) * half])
    torch.save(dict(state={k: v for k, v in net.state_dict().items()},
                    report={k: v for k, v in report.items()
                            if k != 'seconds'}),
               osp.join(out_dir, f'rank{rank}.pt'))


def test_two_processes_pool_exactly(tmp_path):
    results = run_and_load(_two_processes, tmp_path)
    net = make_net()
    recompute_statistics(net, make_batches(6))
    for r in results:
        assert r['report']['num_batches'] == 3
        assert r['report']['total_batches'] == 6
        assert r['report']['updated'] == ['bn1', 'bn2']
    for key, value in net.state_dict().items():
        # the processes agree exactly, and with one process up to rounding
        assert torch.equal(results[0]['state'][key], results[1]['state'][key])
        assert_close(results[0]['state'][key], value)


# --------------------------------------------------------------- errors
@pytest.mark.parametrize('kwargs, shown', [
    (dict(batches=[]), 'got no batch'),
    (dict(batches=None), 'NoneType'),
    (dict(batches=torch.zeros(2, 3, 6, 6)), 'Tensor'),
    (dict(num_batches=0), 'got 0'),
    (dict(num_batches=True), 'got True'),
    (dict(normalize='ema'), "'ema'"),
    (dict(layers=['conv1']), "'conv1' is not a BN-style layer"),
    (dict(layers=['nope']), "'nope' is not a module"),
    (dict(layers='bn1'), "'bn1'"),
    (dict(forward=3), 'got 3'),
])
def test_bad_arguments_name_the_value(kwargs, shown):
    net = make_net()
    before = copy.deepcopy(net.state_dict())
    kwargs = dict(dict(batches=make_batches(1)), **kwargs)
    with pytest.raises(ValueError) as err:
        recompute_statistics(net, **kwargs)
    assert shown in str(err.value)
    assert_same(net.state_dict(), before)


@pytest.mark.parametrize('kwargs, shown', [
    (dict(num_batches=0), 'num_batches must be an integer >= 1, got 0'),
    (dict(num_batches=2.0), 'got 2.0'),
    (dict(interval=0), 'interval must be an integer >= 1, got 0'),
    (dict(interval=False), 'got False'),
    (dict(by_epoch='yes'), "by_epoch must be True or False, got 'yes'"),
    (dict(normalize='eval'), "got 'eval'"),
    (dict(dataloader='train'), "got 'train'"),
])
def test_bad_hook_options_name_the_value(kwargs, shown):
    with pytest.raises(ValueError) as err:
        PreciseStatsHook(**kwargs)
    assert shown in str(err.value)
    assert str(err.value).startswith('PreciseStatsHook ')


def test_hook_is_registered_in_root_hooks():
    assert HOOKS.get('PreciseStatsHook') is PreciseStatsHook


# --------------------------------------------------------------- runner
@DATASETS.register_module(force=True)
class CountingImages(RandomImages):
    """RandomImages counting its item reads, per instance."""

    instances = []

    def __init__(self, n=8):
        super().__init__(n)
        self.reads = 0
        CountingImages.instances.append(self)

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


class Record(Hook):
    """Per iteration: the batch and loss; per epoch (at this hook's
    priority): the norm layers' running statistics and the model state."""

    def __init__(self, priority):
        self.priority = priority
        self.batches, self.losses, self.stats, self.states = [], [], [], []

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.batches.append(data_batch['inputs'].clone())
        self.losses.append(float(outputs['loss'].detach()))

    def after_train_epoch(self, runner):
        model = runner.model
        self.stats.append([t.clone() for n, t in model.state_dict().items()
                           if n.endswith(RUNNING)])
        self.states.append(copy.deepcopy(model.state_dict()))


class StopAfter(Hook):

    def __init__(self, epochs):
        self.epochs = epochs

    def after_train_epoch(self, runner):
        if runner.epoch + 1 == self.epochs:
            runner.train_loop.stop_training = True


def tiny_runner(work_dir, hooks, name, norm_cfg=None, **overrides):
    cfg = tiny_config(work_dir, max_epochs=3, norm_cfg=norm_cfg)
    cfg['train_dataloader']['dataset'] = dict(type='CountingImages')
    cfg['custom_hooks'] += hooks
    cfg.update(overrides)
    return Runner(**cfg, experiment_name=f'{name}-{osp.basename(work_dir)}')


class SpyPasses:
    """Wraps the hook's call of recompute_statistics: records the batches
    (drawn inside preserved random states, as the pass draws them) and the
    runner iteration."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = hook_module.recompute_statistics

        def spy(model, batches, num_batches=None, **kwargs):
            with preserved_rng():
                batches = list(islice(batches, num_batches))
            self.calls.append(batches)
            return real(model, batches, **kwargs)

        monkeypatch.setattr(hook_module, 'recompute_statistics', spy)


def test_hook_reestimates_at_interval_and_end(tmp_path, monkeypatch, mmlogs):
    # without the hook
    CountingImages.instances.clear()
    plain = Record('LOWEST')
    tiny_runner(tmp_path / 'plain', [plain], 'plain').train()
    assert [d.reads for d in CountingImages.instances] == [24]

    CountingImages.instances.clear()
    spy = SpyPasses(monkeypatch)
    first, last = Record('HIGHEST'), Record('LOWEST')
    hook = dict(type='PreciseStatsHook', num_batches=3, interval=2)
    runner = tiny_runner(tmp_path / 'hooked', [hook, first, last], 'hooked')
    runner.train()

    # training saw the same batches, losses and weights as without the hook
    # (its own dataloader, random states untouched); the hook's dataset
    # gave 2 passes x 3 batches x 2 images
    assert all(torch.equal(a, b) for a, b in zip(plain.batches,
                                                 last.batches))
    assert plain.losses == last.losses and len(last.losses) == 12
    assert [d.reads for d in CountingImages.instances] == [24, 12]
    for key, value in plain.states[-1].items():
        if not key.endswith(RUNNING):
            assert torch.equal(value, last.states[-1][key]), key

    # re-estimated after epochs 2 (the interval) and 3 (the end) only,
    # before the checkpoint of the same stage
    changed = [not all(torch.equal(a, b) for a, b in zip(x, y))
               for x, y in zip(first.stats, last.stats)]
    assert changed == [False, True, True]
    assert len(spy.calls) == 2 and all(len(c) == 3 for c in spy.calls)
    ckpt = torch.load(str(tmp_path / 'hooked' / 'epoch_3.pth'))['state_dict']
    reference = TinyCBNNet(norm_cfg=dict(type='CBN', window=3))
    reference.load_state_dict(last.states[-1])
    recompute_statistics(reference, spy.calls[-1], forward=train_forward)
    for key, value in reference.state_dict().items():
        assert torch.equal(ckpt[key], last.states[-1][key]), key
        if key.endswith(RUNNING):
            assert_close(ckpt[key], value)
            assert not torch.allclose(ckpt[key], plain.states[-1][key])
    times = runner.message_hub.get_scalar(TIME_KEY).data[0]
    assert len(times) == 2 and all(t > 0 for t in times)
    said = [m for m in mmlogs.messages if m.startswith('PreciseStatsHook')]
    assert len(said) == 2
    assert said[0].startswith('PreciseStatsHook: re-estimated the running '
                              'statistics of 2 layers from 3 batches')


def test_hook_by_iteration_and_after_an_early_stop(tmp_path, monkeypatch):
    done = []
    real = PreciseStatsHook.run_pass

    def run_pass(self, runner, done_at=None):
        done.append(done_at)
        return real(self, runner, done_at)

    monkeypatch.setattr(PreciseStatsHook, 'run_pass', run_pass)
    hook = dict(type='PreciseStatsHook', num_batches=2, interval=3,
                by_epoch=False)
    runner = tiny_runner(
        tmp_path / 'iter', [hook], 'iter', norm_cfg=dict(type='BN'),
        train_cfg=dict(by_epoch=False, max_iters=7), param_scheduler=None,
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', by_epoch=False,
                            interval=7),
            logger=dict(type='LoggerHook', interval=1)))
    runner.train()
    # after iterations 3 and 6 (the interval) and 7 (the last); none more
    # in after_train
    assert done == [3, 6, 7]
    ckpt = torch.load(str(tmp_path / 'iter' / 'iter_7.pth'))['state_dict']
    for key, value in runner.model.state_dict().items():
        assert torch.equal(ckpt[key], value), key

    # an early stop after epoch 1 of 3 with interval 2: after_train runs it
    done.clear()
    spy = SpyPasses(monkeypatch)
    hook = dict(type='PreciseStatsHook', num_batches=2, interval=2)
    runner = tiny_runner(tmp_path / 'stop', [hook, StopAfter(1)], 'stop',
                         norm_cfg=dict(type='BN'))
    runner.train()
    assert runner.iter == 4 and len(spy.calls) == 1 and done == [4]
    hook = next(h for h in runner.hooks if isinstance(h, PreciseStatsHook))
    assert hook.done_at == 4 and hook.last_report['updated'] == [
        'conv1.bn', 'conv2.bn']
