# Copyright (c) mmcbn contributors. All rights reserved.
"""CBN health metrics (issue 12): what they are, where they go, what they
cost.

- In an mmengine runner the ``cbn_*`` scalars reach the message hub, the
  json log and ``scalars.json`` in exactly the iterations the
  ``LoggerHook`` logs, per layer group on request. The text log shows a
  summary of them once the window is on (``text_log='summary'``), or every
  one of them (``'full'``), or none (``'none'``).
- Their values equal an independent computation: a first-order Taylor
  expansion by ``torch.func.jvp`` of the producing convolution on the
  recorded inputs, and :func:`mmcbn.window_statistics`.
- They cost nothing between log intervals: no health term is computed and
  no host synchronization happens, over whole runner iterations.
- Warnings name the layers, once per run.
- mmdet's own ``analyze_logs.py plot_curve`` plots them from a CBN run's
  json log.
"""
import itertools
import json
import os
import os.path as osp
import re
import subprocess
import sys
from collections import defaultdict

import matplotlib.image as mpimg
import pytest
import torch
import torch.nn.functional as F
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import MODELS
from mmengine.runner import Runner
from torch import nn

import mmcbn
import mmcbn.cbn
from mmcbn import (CBN2d, binding_report, read_cbn_health, set_cbn_iteration,
                   set_cbn_monitor, window_statistics)
from mmcbn.health import METRICS, SUMMARY_METRICS, health_warnings
from mmcbn.hooks.cbn_hook import CBNHook, log_key
from sync_counter import SyncCounter
from tiny_cbn import tiny_config

COUNTS = ('bound', 'frozen', 'unbound')
#: Every model-wide key CBNHook logs.
MODEL_KEYS = [f'cbn_{m}' for m in list(METRICS) + list(COUNTS)]


# --------------------------------------------------------------- helpers
class WatchScalars(Hook):
    """After every iteration (after CBNHook and LoggerHook), which
    ``train/cbn_*`` scalars the message hub updated, and their values."""

    priority = 'LOWEST'

    def __init__(self):
        self.updates = {}  # iteration -> {key: value}
        self._sizes = {}

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None):
        changed = {}
        for key, buf in runner.message_hub.log_scalars.items():
            if not key.startswith('train/cbn_'):
                continue
            size = len(buf.data[0])
            if size != self._sizes.get(key, 0):
                changed[key[len('train/'):]] = float(buf.current())
            self._sizes[key] = size
        if changed:
            self.updates[runner.iter] = changed


_RUNS = itertools.count()


def make_cfg(work_dir,
             log_interval,
             norm_cfg=None,
             hook=None,
             epochs=3,
             model=None):
    cfg = tiny_config(work_dir, epochs, norm_cfg)
    # runners started within one second would otherwise share their
    # logger and visualizer (named by the timestamp), so their files
    cfg['experiment_name'] = f'cbn_health_{os.getpid()}_{next(_RUNS)}'
    cfg['default_hooks']['logger']['interval'] = log_interval
    cfg['custom_hooks'] = [hook or dict(type='CBNHook')]
    if model is not None:
        cfg['model'] = model
    return cfg


def run(cfg, *hooks):
    runner = Runner(**cfg)
    for hook in hooks:
        runner.register_hook(hook)
    runner.train()
    return runner


def json_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_lines(path):
    """The 'Epoch(train)' lines of a text log."""
    with open(path) as f:
        return [line for line in f if 'Epoch(train)' in line]


def run_files(runner):
    """The run's text log, json log and LocalVisBackend scalars.json."""
    log_dir = runner.log_dir
    stamp = osp.basename(log_dir)
    return (osp.join(log_dir, f'{stamp}.log'),
            osp.join(log_dir, 'vis_data', f'{stamp}.json'),
            osp.join(log_dir, 'vis_data', 'scalars.json'))


# ------------------------------------------------- the runner, the logs
def test_scalars_reach_message_hub_text_log_and_json(tmp_path):
    """LoggerHook interval 3 on 4 iterations per epoch logs batch 2 of each
    epoch (runner iterations 2, 6, 10: not the multiples of 3), burn-in 1.5
    epochs (iterations 0-5), window 3. ``text_log='full'``: the text log
    shows every value, in burn-in too."""
    watch = WatchScalars()
    runner = run(
        make_cfg(
            tmp_path,
            3,
            hook=dict(type='CBNHook', health_by_group=True,
                      text_log='full')), watch)
    groups = ('conv1', 'conv2')  # conv1.bn, conv2.bn
    keys = set(MODEL_KEYS) | {f'cbn_{m}_{g}' for m in METRICS for g in groups}
    # exactly the logged iterations, every key each time
    assert sorted(watch.updates) == [2, 6, 10]
    for values in watch.updates.values():
        assert set(values) == keys
    burnin, first, last = (watch.updates[i] for i in (2, 6, 10))
    # in burn-in CBN is BatchNorm: no window entry, and every other metric
    # is 0 (the value for BatchNorm), so each log line has every key
    assert all(burnin[k] == 0 for k in keys - {f'cbn_{c}' for c in COUNTS})
    for values in (first, last):
        # window 3: the entries of the 2 iterations before are used
        for g in ('', '_conv1', '_conv2'):
            assert values[f'cbn_window_fill{g}'] == 1
        assert values['cbn_comp_mean'] > 0 and values['cbn_comp_nu'] > 0
        assert values['cbn_batch_vs_window_mean'] > 0
        assert values['cbn_batch_vs_window_var'] > 0
        assert 0 <= values['cbn_repaired_frac'] <= 1
        # model-wide values pool the two layers (same channels and entries)
        for m in ('comp_mean', 'comp_nu', 'batch_vs_window_mean',
                  'batch_vs_window_var'):
            assert values[f'cbn_{m}'] == pytest.approx(
                (values[f'cbn_{m}_conv1'] + values[f'cbn_{m}_conv2']) / 2)
    for values in (burnin, first, last):
        assert (values['cbn_bound'], values['cbn_frozen'],
                values['cbn_unbound']) == (2, 0, 0)

    text_log, json_log, scalars = run_files(runner)
    # text log: one 'Epoch(train)' line per logged iteration, with the values
    lines = train_lines(text_log)
    assert len(lines) == 3
    for line, it in zip(lines, (2, 6, 10)):
        for key, value in watch.updates[it].items():
            shown = f'{value:.4f}' if key not in {f'cbn_{c}'
                                                  for c in COUNTS} else \
                f'{int(value)}'
            assert re.search(rf'\s{key}: {re.escape(shown)}\s', line), \
                (key, line)
    # json log and LocalVisBackend scalars.json: step = iteration + 1
    for path in (json_log, scalars):
        logged = json_lines(path)
        assert [entry['step'] for entry in logged] == [3, 7, 11]
        for entry, it in zip(logged, (2, 6, 10)):
            assert {
                k: entry[k]
                for k in keys
            } == pytest.approx(
                watch.updates[it], abs=0)


#: The text log's keys with text_log='summary', after burn-in.
SUMMARY_KEYS = {f'cbn_{m}' for m in SUMMARY_METRICS}


@pytest.mark.parametrize('text_log', ['summary', 'none'])
def test_text_log_shows_a_summary_after_burnin(tmp_path, text_log):
    """The same run as above with the default ``text_log='summary'`` (and
    ``'none'``): the text log shows at most 3 ``cbn_*`` values, none in
    burn-in; the message hub, the json log and scalars.json get every
    value of every group."""
    watch = WatchScalars()
    runner = run(
        make_cfg(
            tmp_path,
            3,
            hook=dict(type='CBNHook', health_by_group=True,
                      text_log=text_log)), watch)
    groups = ('conv1', 'conv2')
    keys = set(MODEL_KEYS) | {f'cbn_{m}_{g}' for m in METRICS for g in groups}
    assert len(keys) > 20
    assert sorted(watch.updates) == [2, 6, 10]
    assert all(set(values) == keys for values in watch.updates.values())

    text_log_path, json_log, scalars = run_files(runner)
    lines = train_lines(text_log_path)
    shown = [set(re.findall(r'(?<!\S)(cbn_\w+): ', line)) for line in lines]
    expected = SUMMARY_KEYS if text_log == 'summary' else set()
    assert 0 < len(SUMMARY_KEYS) <= 3
    # iteration 2 is in burn-in: no cbn_ value; then the summary
    assert shown == [set(), expected, expected], lines
    for line, it in zip(lines[1:], (6, 10)):
        for key in expected:
            value = f'{watch.updates[it][key]:.4f}'
            assert re.search(rf'\s{key}: {re.escape(value)}(\s|$)', line)
    # the rest of each line is mmengine's, untouched
    assert all(re.search(r'\sloss: \d', line) for line in lines)
    # the json log and scalars.json: every key, every logged iteration
    for path in (json_log, scalars):
        logged = json_lines(path)
        assert [entry['step'] for entry in logged] == [3, 7, 11]
        for entry, it in zip(logged, (2, 6, 10)):
            assert {k: entry[k] for k in keys} == watch.updates[it]
    # after training the runner's log processor has its own method back
    assert 'get_log_after_iter' not in vars(runner.log_processor)


@pytest.mark.parametrize('bad', ['sumary', 'Full', None, True, ['full']])
def test_text_log_rejects_a_bad_value(bad):
    with pytest.raises(ValueError) as err:
        CBNHook(text_log=bad)
    message = str(err.value)
    assert 'text_log' in message and repr(bad) in message
    assert "'summary', 'full', 'none'" in message


@MODELS.register_module()
class BoundFrozenUnboundNet(BaseModel):
    """One CBN layer of each binding status: after a trainable conv
    (bound), after a frozen conv on the raw input (frozen), after a ReLU
    (unbound)."""

    def __init__(self, norm_cfg):
        super().__init__()
        norm = dict(norm_cfg)
        norm.pop('type')
        self.frozen_conv = nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)
        self.frozen_bn = CBN2d(4, **norm)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = CBN2d(6, **norm)
        self.unbound_bn = CBN2d(6, **norm)
        self.head = nn.Linear(6, 2)

    def forward(self, inputs, labels=None, mode='tensor'):
        x = self.frozen_bn(self.frozen_conv(inputs))
        x = self.bn(self.conv(x))
        x = self.unbound_bn(F.relu(x))
        logits = self.head(x.mean((2, 3)))
        if mode == 'loss':
            return dict(loss=F.cross_entropy(logits, labels))
        return logits


def test_binding_counts_match_binding_report(tmp_path, mmlogs):
    watch = WatchScalars()
    runner = run(
        make_cfg(
            tmp_path,
            2,
            norm_cfg=dict(type='CBN', window=3, burnin=2),
            model=dict(
                type='BoundFrozenUnboundNet',
                norm_cfg=dict(type='CBN', window=3, burnin=2)),
            epochs=1), watch)
    report = binding_report(runner.model)
    status = {
        name: ('unbound' if entries[0].startswith('unbound') else
               'frozen' if entries[0].startswith('frozen') else 'bound')
        for name, entries in report.items()
    }
    assert status == dict(frozen_bn='frozen', bn='bound', unbound_bn='unbound')
    assert report['bn'] == ['conv']
    logged = watch.updates[max(watch.updates)]
    assert {
        c: logged[f'cbn_{c}']
        for c in COUNTS
    } == {
        c: list(status.values()).count(c)
        for c in COUNTS
    }
    # the frozen window is exact: no compensation; the unbound layer uses
    # no window (so the pooled fill is 2 of 3 layers)
    assert logged['cbn_window_fill'] == pytest.approx(2 / 3)


@pytest.mark.parametrize('compensate', [True, False])
def test_naive_cbn_has_no_compensation(tmp_path, compensate):
    watch = WatchScalars()
    run(
        make_cfg(
            tmp_path,
            2,
            norm_cfg=dict(
                type='CBN', window=3, burnin=2, compensate=compensate)), watch)
    after = [v for it, v in watch.updates.items() if it >= 2]
    assert len(after) == 5
    for values in after:
        assert values['cbn_window_fill'] == 1
        assert values['cbn_batch_vs_window_mean'] > 0
        if compensate:
            assert values['cbn_comp_mean'] > 0 and values['cbn_comp_nu'] > 0
        else:
            assert values['cbn_comp_mean'] == 0 and values['cbn_comp_nu'] == 0


# ----------------------------------------- values: independent reference
class TwoConvNet(nn.Module):
    """conv (bias) -> CBN -> ReLU -> strided conv (no bias) -> CBN."""

    def __init__(self, **cbn):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.n1 = CBN2d(6, **cbn)
        self.c2 = nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=False)
        self.n2 = CBN2d(5, **cbn)

    def forward(self, x):
        return self.n2(self.c2(F.relu(self.n1(self.c1(x)))))


class Recorder:
    """For each iteration: every producer's input and parameters, and
    every CBN layer's input (forward pre-hooks)."""

    def __init__(self, model):
        self.conv_in = defaultdict(dict)
        self.norm_in = defaultdict(dict)
        self.params = defaultdict(dict)
        self.iteration = None
        for conv, norm in (('c1', 'n1'), ('c2', 'n2')):
            getattr(model, conv).register_forward_pre_hook(
                self._keep(self.conv_in, norm, getattr(model, conv)))
            getattr(model, norm).register_forward_pre_hook(
                self._keep(self.norm_in, norm))

    def _keep(self, store, name, conv=None):

        def hook(module, args):
            store[self.iteration][name] = args[0].detach().clone()
            if conv is not None:
                self.params[self.iteration][name] = (
                    conv.weight.detach().clone(),
                    None if conv.bias is None else conv.bias.detach().clone())

        return hook


def conv_moments(conv, inp, weight, bias):
    """Per-channel mean and second moment of ``conv`` with these
    parameters."""
    y = F.conv2d(inp, weight, bias, conv.stride, conv.padding)
    return y.mean((0, 2, 3)), y.square().mean((0, 2, 3))


def reference_terms(model, rec, name, t, lags, eps):
    """A layer's health terms at iteration ``t``, computed independently:
    the first-order Taylor expansion of each earlier iteration's moments by
    ``torch.func.jvp`` of the convolution on that iteration's input."""
    conv = model.c1 if name == 'n1' else model.c2
    w_t, b_t = rec.params[t][name]
    x_t = rec.norm_in[t][name]
    mu_t, var_t = x_t.mean((0, 2, 3)), x_t.var((0, 2, 3), unbiased=False)
    entries = []
    for s in range(t - 1, t - lags - 1, -1):
        inp = rec.conv_in[s][name]
        w_s, b_s = rec.params[s][name]
        if b_s is None:
            raw, delta = torch.func.jvp(
                lambda w: conv_moments(conv, inp, w, None), (w_s, ),
                (w_t - w_s, ))
        else:
            raw, delta = torch.func.jvp(
                lambda w, b: conv_moments(conv, inp, w, b), (w_s, b_s),
                (w_t - w_s, b_t - b_s))
        mu, nu = raw[0] + delta[0], raw[1] + delta[1]
        entries.append((raw, mu, nu))
    spread = var_t + eps
    c = mu_t.numel()
    terms = dict(
        window_fill=(lags / (model.n1.window - 1), 1),
        repaired_frac=(sum(
            int((nu - mu.square() < 0).sum())
            for _, mu, nu in entries), lags * c),
        comp_mean=(sum(
            float(((mu - raw[0]).abs() / spread.sqrt()).sum())
            for raw, mu, _ in entries), lags * c),
        comp_nu=(sum(
            float(((nu - raw[1]).abs() / spread).sum())
            for raw, _, nu in entries), lags * c))
    means = torch.stack([mu_t] + [mu for _, mu, _ in entries])
    vars_ = torch.stack([var_t] + [(nu - mu.square()).clamp(min=0)
                                   for _, mu, nu in entries])
    mean_bar = means.mean(0)
    var_bar = vars_.mean(0) + (means - mean_bar).square().mean(0)
    terms['batch_vs_window_mean'] = (float(
        ((mu_t - mean_bar).abs() / (var_bar + eps).sqrt()).sum()), c)
    terms['batch_vs_window_var'] = (float(
        torch.log((var_t + eps) / (var_bar + eps)).abs().sum()), c)
    return terms, means[1:], vars_[1:]


def pooled(*layer_terms):
    return {
        m: sum(t[m][0] for t in layer_terms) / sum(t[m][1]
                                                   for t in layer_terms)
        for m in METRICS
    }


def train_and_monitor(model, iterations, lr, monitored, before=None):
    """A plain training loop (float64, SGD, fixed data) that monitors and
    reads the health metrics at the ``monitored`` iterations, and checks
    the window statistics the layer is about to use there."""
    rec = Recorder(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(3)
    reads = {}
    for t in range(iterations):
        rec.iteration = t
        if before is not None:
            before(t)
        set_cbn_iteration(model, t)
        x = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
        expected_windows = {}
        if t in monitored:
            set_cbn_monitor(model, True)
            expected_windows = {
                name:
                window_statistics(model, getattr(model, name), iteration=t)
                for name in ('n1', 'n2') if t > 0
            }
        out = model(x)
        if t in monitored:
            set_cbn_monitor(model, False)
            reads[t] = (read_cbn_health(model,
                                        by_group=True), expected_windows)
        opt.zero_grad()
        (out.square().mean() + out.mean()).backward()
        opt.step()
    return rec, reads


def test_metrics_equal_an_independent_computation():
    torch.manual_seed(0)
    window, eps = 4, 1e-5
    model = TwoConvNet(window=window, burnin=0, eps=eps).double()
    rec, reads = train_and_monitor(model, 7, 0.2, monitored=(1, 2, 6))
    for t, (health, windows) in reads.items():
        lags = min(t, window - 1)
        per_layer = {}
        for name in ('n1', 'n2'):
            terms, means, vars_ = reference_terms(model, rec, name, t, lags,
                                                  eps)
            per_layer[name] = terms
            # mmcbn.window_statistics gives the same entries
            got = windows[name]
            assert sorted(got) == list(range(1, lags + 1))
            for lag in got:
                torch.testing.assert_close(got[lag][0], means[lag - 1])
                torch.testing.assert_close(got[lag][1], vars_[lag - 1])
            for metric in METRICS:
                value, count = terms[metric]
                assert health[f'{metric}/{name}'] == pytest.approx(
                    value / count, rel=1e-7, abs=1e-12), (t, name, metric)
        expected = pooled(*per_layer.values())
        for metric in METRICS:
            assert health[metric] == pytest.approx(
                expected[metric], rel=1e-7, abs=1e-12), (t, metric)
        assert health['window_fill'] == pytest.approx(lags / (window - 1))
        assert health['comp_mean'] > 0 and health['batch_vs_window_var'] > 0
        assert (health['bound'], health['frozen'], health['unbound']) == (2, 0,
                                                                          0)
    # the filling windows: 1 and 2 of 3 earlier entries, then full
    assert [reads[t][0]['window_fill']
            for t in (1, 2, 6)] == pytest.approx([1 / 3, 2 / 3, 1])


def test_repaired_frac_on_a_constructed_case():
    """Weights fixed for 3 iterations, then channels 0 and 1 of the second
    conv (no bias) scaled by 0.2: their first-order second moment is
    ``nu (2 * 0.2 - 1) < 0``, so those (entry, channel) pairs need the
    repair, and no other: 2 of 5 channels."""
    torch.manual_seed(0)
    eps = 1e-5
    model = TwoConvNet(window=4, burnin=0, eps=eps).double()
    scale = torch.tensor([0.2, 0.2, 1, 1, 1], dtype=torch.float64)

    def before(t):
        if t == 3:
            with torch.no_grad():
                model.c2.weight.mul_(scale.view(-1, 1, 1, 1))

    rec, reads = train_and_monitor(
        model, 4, 0.0, monitored=(3, ), before=before)
    health = reads[3][0]
    terms = {
        name: reference_terms(model, rec, name, 3, 3, eps)[0]
        for name in ('n1', 'n2')
    }
    assert terms['n2']['repaired_frac'] == (6, 15)  # independent count
    assert health['repaired_frac/n2'] == pytest.approx(0.4)
    assert terms['n1']['repaired_frac'] == (0, 18)
    assert health['repaired_frac/n1'] == 0
    assert health['repaired_frac'] == pytest.approx(6 / 33)
    for metric in METRICS:
        assert health[metric] == pytest.approx(
            pooled(*terms.values())[metric], rel=1e-7, abs=1e-12)


@pytest.mark.parametrize('bad', [float('inf'), float('nan')])
def test_a_nonfinite_monitored_iteration_adds_nothing(bad):
    """A log interval with a NaN/Inf batch in it: the metrics are those of
    its finite iterations (as if the bad one had not been monitored), not
    NaN; the event counters report the bad batch."""
    from mmcbn import read_cbn_flags

    def run_monitoring(monitored):
        torch.manual_seed(0)
        model = TwoConvNet(window=4, burnin=0).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(3)
        for t in range(7):
            set_cbn_iteration(model, t)
            set_cbn_monitor(model, t in monitored)
            x = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
            if t == 6:
                x[1, 2, 3, 3] = bad
            out = model(x)
            if t < 6:
                opt.zero_grad()
                (out.square().mean() + out.mean()).backward()
                opt.step()
        assert not torch.isfinite(out).all()
        return read_cbn_health(model, by_group=True), read_cbn_flags(model)

    health, flags = run_monitoring(monitored=(5, 6))
    clean, _ = run_monitoring(monitored=(5, ))
    assert set(health) == set(clean)
    for key, value in clean.items():
        assert health[key] == pytest.approx(value, rel=1e-12, abs=0), key
    assert clean['comp_mean'] > 0 and clean['batch_vs_window_var'] > 0
    assert flags['n1'] == dict(dropped=0, skipped=1, not_stored=1)


# --------------------------------------------------------------- warnings
class StemHeadNet(nn.Module):
    """stem: conv (no bias) -> CBN; head: conv (bias) -> CBN."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential()
        self.stem.add_module('conv', nn.Conv2d(3, 4, 3, padding=1, bias=False))
        self.stem.add_module('bn', CBN2d(4, window=4))
        self.head = nn.Sequential()
        self.head.add_module('conv', nn.Conv2d(4, 4, 3, padding=1))
        self.head.add_module('bn', CBN2d(4, window=4))

    def forward(self, x):
        return self.head(F.relu(self.stem(x)))


def symmetric_batch(gen):
    """Images and their negatives: the stem conv output has mean 0."""
    z = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    return torch.cat([z, -z])


def monitored_step(model, t, x, opt=None):
    set_cbn_iteration(model, t)
    set_cbn_monitor(model, True)
    out = model(x)
    read_cbn_health(model)
    if opt is not None:
        opt.zero_grad()
        out.square().mean().backward()
        opt.step()
    return health_warnings(model)


def test_warnings_name_the_layers_once_per_run(mmlogs):
    torch.manual_seed(0)
    model = StemHeadNet().double()
    mmcbn.name_cbn_layers(model)
    gen = torch.Generator().manual_seed(0)
    for t in range(3):  # fixed weights: exact windows
        assert monitored_step(model, t, symmetric_batch(gen)) == []
    with torch.no_grad():
        # stem: weights x 0.2, so first-order nu < 0 on every entry, but
        # its mean stays 0 (no mean compensation); head: a bias shift of 3
        # standard deviations (mean compensation 3 x the spread)
        model.stem.conv.weight.mul_(0.2)
        std = model.head.bn.running_var.sqrt()
        model.head.conv.bias.add_(3 * std.clamp(min=1))
    messages = monitored_step(model, 3, symmetric_batch(gen))
    assert len(messages) == 2
    repairs = next(m for m in messages if 'repair' in m)
    large = next(m for m in messages if 'larger than' in m)
    assert 'stem.bn (1.00)' in repairs and 'head.bn' in repairs
    assert 'longer burnin or a smaller window' in repairs
    assert 'head.bn' in large and 'stem.bn' not in large
    assert model.stem.bn._last_health['comp_mean'] < 1e-6
    assert model.head.bn._last_health['comp_mean'] > 1
    # logged through mmengine's logger, as warnings
    logged = [r for r in mmlogs.records if r.getMessage() in messages]
    assert len(logged) == 2 and all(r.levelname == 'WARNING' for r in logged)
    # once per run: the same condition again logs nothing
    with torch.no_grad():
        model.stem.conv.weight.mul_(0.2)
    assert monitored_step(model, 4, symmetric_batch(gen)) == []
    assert model.stem.bn._last_health['repaired_frac'] > 0.25


def test_no_warning_for_a_healthy_run(mmlogs):
    torch.manual_seed(0)
    model = StemHeadNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for t in range(10):
        assert monitored_step(model, t, symmetric_batch(gen), opt) == []
    health = model.stem.bn._last_health
    assert health['window_fill'] == 1 and 0 < health['comp_mean'] < 1
    assert not [m for m in mmlogs.messages if 'CBN: ' in m]


class FlipConv1(Hook):
    """From ``start`` on, negate conv1's weight before every iteration: the
    entry of the iteration before has first-order nu = -3 nu < 0."""

    priority = 'LOW'

    def __init__(self, start):
        self.start = start

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter >= self.start:
            with torch.no_grad():
                runner.model.conv1.conv.weight.neg_()


@pytest.mark.parametrize('flip', [False, True])
def test_repair_warning_in_a_runner(tmp_path, mmlogs, flip):
    cfg = make_cfg(tmp_path, 2, norm_cfg=dict(type='CBN', window=3, burnin=4))
    run(cfg, *([FlipConv1(start=4)] if flip else []))
    warned = [m for m in mmlogs.messages if 'max(nu, mu^2) repair' in m]
    if flip:
        assert len(warned) == 1  # once, though every later log repairs
        assert re.search(r'in conv1\.bn \(0\.\d\d\)\.', warned[0])
        assert 'conv2.bn' not in warned[0]
    else:
        assert warned == []


# ------------------------------------------------ cost: synchronizations
def _origin():
    """Where a synchronizing op comes from: 'read' (CBNHook reading the
    metrics or event counters after the iteration), 'mmcbn' (any other
    mmcbn frame: a layer's forward or backward, the hook elsewhere) or
    'other' (mmengine, the optimizer, the loss)."""
    root = osp.dirname(mmcbn.__file__) + os.sep
    frame = sys._getframe(1)
    names = []
    while frame is not None:
        names.append((frame.f_code.co_filename, frame.f_code.co_name))
        frame = frame.f_back
    in_hook = any(
        f.endswith(osp.join('hooks', 'cbn_hook.py'))
        and fn == 'after_train_iter' for f, fn in names)
    in_read = any(
        f == root + 'health.py' and fn in ('read_cbn_health', 'read_cbn_flags')
        for f, fn in names)
    if in_hook and in_read:
        return 'read'
    if any(f.startswith(root) for f, _ in names):
        return 'mmcbn'
    return 'other'


class OriginSyncCounter(SyncCounter):
    """SyncCounter that counts by origin instead of by operator."""

    def record(self, name):
        self.ops[_origin()] += 1


def count_syncs(cfg, monkeypatch):
    """Run ``cfg``, counting synchronizing ops over each whole runner
    iteration (before_train_iter hooks, forward, loss, backward, optimizer
    step, after_train_iter hooks: CBNHook, the LoggerHook writing the logs,
    ...), and the calls of the layers' health computation."""
    observed = defaultdict(int)
    observe = mmcbn.cbn.observe
    runner = Runner(**cfg)

    def counting_observe(layer, *args):
        observed[runner.iter] += 1
        return observe(layer, *args)

    monkeypatch.setattr(mmcbn.cbn, 'observe', counting_observe)
    loop = runner.train_loop
    run_iter = loop.run_iter
    syncs = {}

    def counted(idx, data_batch):
        it = runner.iter
        with OriginSyncCounter() as counter:
            run_iter(idx, data_batch)
        syncs[it] = dict(counter.ops)

    loop.run_iter = counted
    runner.train()
    return syncs, observed


def test_metrics_cost_nothing_between_log_intervals(tmp_path, monkeypatch):
    norm = dict(type='CBN', window=3, burnin=2)
    logged = {2, 6, 10}  # LoggerHook interval 3, 4 iterations per epoch
    syncs, observed = count_syncs(
        make_cfg(tmp_path / 'cbn', 3, norm_cfg=norm), monkeypatch)
    assert sorted(syncs) == list(range(12))
    for it, ops in syncs.items():
        if it in logged:
            # the health terms are computed in the logged iterations only
            # (2 layers, one call each), and read once after them
            assert observed[it] == 2
            assert ops.get('read', 0) > 0
        else:
            assert observed[it] == 0
            assert ops.get('read', 0) == 0
        # never from a CBN forward or backward, nor elsewhere in the hook
        assert ops.get('mmcbn', 0) == 0, (it, ops)
    # the rest is mmengine's own (the loss value for the log, every
    # iteration): the same count as a BatchNorm run of the same model
    bn_syncs, _ = count_syncs(
        make_cfg(
            tmp_path / 'bn',
            3,
            norm_cfg=dict(type='BN'),
            hook=dict(type='CBNHook', health=False)), monkeypatch)
    for it in range(12):
        assert syncs[it].get('other', 0) == bn_syncs[it].get('other', 0)
        assert bn_syncs[it].get('other', 0) > 0  # the counter sees them

    # the counting can fail: monitoring forced on every iteration
    # (CBNHook(interval=1) reads every iteration whatever the LoggerHook
    # does) makes the layers compute and the hook read every iteration
    forced, observed = count_syncs(
        make_cfg(
            tmp_path / 'forced',
            3,
            norm_cfg=norm,
            hook=dict(type='CBNHook', interval=1)), monkeypatch)
    for it, ops in forced.items():
        assert observed[it] == 2 and ops.get('read', 0) > 0, (it, ops)
        assert ops.get('mmcbn', 0) == 0


# -------------------------------------------- mmdet's analyze_logs.py
def analyze_logs_script():
    """mmdet's tools/analysis_tools/analyze_logs.py, as installed with the
    package (mim's copy of the repository's tools/)."""
    import mmdet
    path = osp.join(
        osp.dirname(mmdet.__file__), '.mim', 'tools', 'analysis_tools',
        'analyze_logs.py')
    assert osp.isfile(path), f'mmdet 3.3.0 installs its tools at {path}'
    return path


def curve_columns(png):
    """Image columns holding a line pixel of matplotlib's first colour
    (blue), inside the axes: a curve over the run spans most of the width,
    the legend's sample line about 30 pixels."""
    img = mpimg.imread(png)[..., :3]
    blue = (img[..., 2] - img[..., 0] > 0.15) & (
        img[..., 2] > img[..., 1] + 0.05)
    return int(blue.any(0).sum())


def plot_curve(json_log, key, out, cwd):
    env = dict(os.environ, MPLBACKEND='Agg')
    proc = subprocess.run([
        sys.executable,
        analyze_logs_script(), 'plot_curve', json_log, '--keys', key,
        '--legend', key, '--out', out
    ],
                          cwd=cwd,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert osp.isfile(out)
    return curve_columns(out)


def test_mmdet_analyze_logs_plots_cbn_keys(tmp_path):
    runner = run(
        make_cfg(
            tmp_path,
            1,
            hook=dict(type='CBNHook', health_by_group=True),
            epochs=4))
    _, json_log, _ = run_files(runner)
    keys = ('cbn_window_fill', 'cbn_comp_mean_conv2', 'loss')
    widths = {
        key: plot_curve(json_log, key, str(tmp_path / f'{key}.png'), tmp_path)
        for key in keys
    }
    for key, width in widths.items():
        assert width > 250, (key, width)  # a curve across the axes
        assert os.path.getsize(tmp_path / f'{key}.png') > 10000

    # With '/' in the names (cbn/window_fill, as mmengine's hierarchy
    # would suggest), analyze_logs takes them for validation metrics and
    # drops the rest of each line, 'step' included: every curve of the
    # run comes out empty, the loss too. This is why the keys are cbn_*.
    def slash(key):
        return 'cbn/' + key[4:] if key.startswith('cbn_') else key

    slashed = tmp_path / 'slashed.json'
    with open(slashed, 'w') as f:
        for line in json_lines(json_log):
            f.write(json.dumps({slash(k): v for k, v in line.items()}) + '\n')
    for key in ('window_fill', 'loss'):
        width = plot_curve(
            str(slashed), key, str(tmp_path / f'slashed_{key}.png'), tmp_path)
        assert width < 60, (key, width)  # the legend sample only


def test_log_keys_have_no_slash():
    assert log_key('window_fill') == 'cbn_window_fill'
    assert log_key('comp_mean/backbone') == 'cbn_comp_mean_backbone'
    assert not any('/' in log_key(m) for m in METRICS)
