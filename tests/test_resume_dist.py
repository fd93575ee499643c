# Copyright (c) mmcbn contributors. All rights reserved.
"""Resume in a run of several processes (2 gloo processes, real runners).

Each process saves its own window state beside the checkpoint
(``<checkpoint>.cbn_window.rank<r>.pt``) and reads only its own back; the
checkpoint lists the files. The model has a head shared over two levels
(two call positions of one layer), and at the checkpoint every ring buffer
has wrapped (its next slot is not 0), so a restore that lost the order or
mixed up positions or processes would show.
"""
import copy
import os
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import MODELS
from mmengine.runner import Runner
from torch import nn

from dist_utils import run_processes
from mmcbn import cbn_layers
from mmcbn.resume import WindowStateMismatch, collect_window_state
from tiny_cbn import tiny_config

WINDOW = 4
#: The checkpoint resumed from: 4 iterations recorded in windows of 3
#: earlier entries, so every ring buffer's next slot is 1.
AT = 4
TOTAL = 8


@MODELS.register_module(force=True)
class SharedHeadNet(BaseModel):
    """A stem, and a head shared over two levels (full and half
    resolution): ``head.bn`` is called twice per iteration."""

    def __init__(self, norm_cfg):
        super().__init__()
        self.stem = ConvModule(3, 8, 3, padding=1, norm_cfg=norm_cfg)
        self.head = ConvModule(8, 8, 3, padding=1, norm_cfg=norm_cfg)
        self.fc = nn.Linear(8, 2)

    def forward(self, inputs, labels=None, mode='tensor'):
        feat = self.stem(inputs)
        levels = (feat, F.avg_pool2d(feat, 2))
        logits = self.fc(sum(self.head(x).mean((2, 3)) for x in levels))
        if mode == 'loss':
            return dict(loss=F.cross_entropy(logits, labels))
        return logits


class CaptureWindows(Hook):
    """The window state at the checkpoint of iteration ``at``, and right
    after a resume (before the first resumed iteration)."""

    priority = 'LOWEST'

    def __init__(self, at):
        self.at = at
        self.saved = self.restored = self.next_slots = None

    def before_train(self, runner):
        self.restored = _copy(collect_window_state(_model(runner)))

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter + 1 == self.at:
            model = _model(runner)
            self.saved = _copy(collect_window_state(model))
            self.next_slots = {
                name: [w._next for w in layer._windows]
                for name, layer in cbn_layers(model)
            }
            self.nbytes = sum(layer.window_state_nbytes()
                              for _, layer in cbn_layers(model))


def _copy(state):
    # (on the CPU the collected tensors are the live window buffers)
    return copy.deepcopy(state)


def _model(runner):
    return getattr(runner.model, 'module', runner.model)


def config(work_dir, max_iters, interval=100, distributed=True, **hook):
    cfg = tiny_config(work_dir, norm_cfg=dict(type='CBN', window=WINDOW))
    cfg['model'] = dict(type='SharedHeadNet',
                        norm_cfg=dict(type='CBN', window=WINDOW))
    cfg['train_cfg'] = dict(by_epoch=False, max_iters=max_iters)
    cfg['param_scheduler'] = dict(type='MultiStepLR', milestones=[100],
                                  by_epoch=False)
    cfg['default_hooks']['checkpoint'] = dict(
        type='CheckpointHook', interval=interval, by_epoch=False,
        max_keep_ckpts=2, save_last=interval < 100)
    cfg['custom_hooks'] = [dict(type='CBNHook', **hook)]
    cfg['experiment_name'] = f'resume_dist_{osp.basename(str(work_dir))}'
    if distributed:
        cfg.update(
            launcher='pytorch',
            env_cfg=dict(dist_cfg=dict(backend='gloo')),
            model_wrapper_cfg=dict(type='MMDistributedDataParallel',
                                   device_ids=None,
                                   broadcast_buffers=False))
    return cfg


def train(cfg, resume=None, capture=None):
    runner = Runner.from_cfg(
        Config(dict(cfg, load_from=resume, resume=resume is not None)))
    if capture is not None:
        runner.register_hook(capture)
    runner.train()
    state = {k: v.detach().clone() for k, v in
             _model(runner).state_dict().items()}
    optim = runner.optim_wrapper.state_dict()['state']
    return state, optim


def _worker(rank, world, out_dir):
    import mmcbn.hooks.cbn_hook as cbn_hook
    # (what torchrun sets; mmengine reads LOCAL_RANK when it wraps the model)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank),
                      WORLD_SIZE=str(world))
    full = train(config(osp.join(out_dir, 'full'), TOTAL))
    first = CaptureWindows(AT)
    train(config(osp.join(out_dir, 'first'), 5, interval=2), capture=first)
    reads = []
    read = cbn_hook._read_window_file

    def counting_read(path):
        payload = read(path)
        reads.append((osp.basename(path), sum(
            t.numel() * t.element_size()
            for t in _tensors(payload))))
        return payload

    cbn_hook._read_window_file = counting_read
    resumed_capture = CaptureWindows(-1)
    try:
        resumed = train(
            config(osp.join(out_dir, 'resumed'), TOTAL),
            resume=osp.join(out_dir, 'first', f'iter_{AT}.pth'),
            capture=resumed_capture)
    finally:
        cbn_hook._read_window_file = read
    torch.save(
        dict(saved=first.saved, next_slots=first.next_slots,
             nbytes=first.nbytes, restored=resumed_capture.restored,
             reads=reads, full=full, resumed=resumed),
        osp.join(out_dir, f'rank{rank}.pt'))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _assert_same(a, b, where=''):
    """Equal nested window states (tensors bit for bit)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f'{where}/{key}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f'{where}[{i}]')
    else:
        assert a == b, where


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp('resume_dist')
    run_processes(_worker, 2, (str(out), ), timeout=600)
    return out, [torch.load(str(out / f'rank{r}.pt')) for r in range(2)]


def test_each_process_gets_its_own_windows_back(runs):
    _, ranks = runs
    for rank in ranks:
        layers = rank['saved']['layers']
        assert set(layers) == {'stem.bn', 'head.bn'}
        assert len(layers['head.bn']['positions']) == 2  # shared head
        # every ring buffer has wrapped: its next slot is not 0
        assert rank['next_slots'] == {'stem.bn': [1], 'head.bn': [1, 1]}
        _assert_same(rank['restored'], rank['saved'])
    # ... and the processes' windows differ (each its own batches)
    means = [r['saved']['layers']['head.bn']['positions'][1]['buffers']
             ['raw_mean'] for r in ranks]
    assert means[0].shape == means[1].shape
    assert not torch.allclose(means[0], means[1])


def test_resumed_processes_continue_exactly(runs):
    """Weights and optimizer state bit-identical to the uninterrupted run
    on both processes (the windows shape every forward). The running
    statistics of process 1 are not part of this: the checkpoint holds
    process 0's buffers, which every process loads (as for BN)."""
    _, ranks = runs
    for r, rank in enumerate(ranks):
        (state, optim), (state_r, optim_r) = rank['full'], rank['resumed']
        assert set(state) == set(state_r)
        for name in state:
            if r == 0 or not name.endswith(('running_mean', 'running_var')):
                assert torch.equal(state[name], state_r[name]), (r, name)
        for idx in optim:
            for key, value in optim[idx].items():
                assert torch.equal(value, optim_r[idx][key]), (idx, key)


def test_each_process_saves_and_loads_only_its_own_windows(runs):
    out, ranks = runs
    work = out / 'first'
    ckpt = torch.load(str(work / f'iter_{AT}.pth'))
    entry = ckpt['cbn_windows']
    # the checkpoint lists the files; it holds no window tensor
    assert set(entry) == {'token', 'world_size', 'files'}
    assert entry['world_size'] == 2 and not list(_tensors(entry))
    names = [f'iter_{AT}.pth.cbn_window.rank{r}.pt' for r in (0, 1)]
    assert entry['files'] == names
    for r, rank in enumerate(ranks):
        payload = torch.load(str(work / names[r]))
        assert payload['rank'] == r
        _assert_same(payload['windows'], rank['saved'])
        # the bytes a process saves and loads: its own windows, no more
        own = sum(t.numel() * t.element_size() for t in _tensors(payload))
        assert own == rank['nbytes'] > 0
        assert rank['reads'] == [(names[r], own)]


def test_window_files_follow_the_checkpoints(runs):
    """Checkpoints at iterations 2, 4 and 5, two kept: the window files of
    iteration 2 went with its checkpoint; none is named like one."""
    out, _ = runs
    files = sorted(os.listdir(out / 'first'))
    assert [f for f in files if f.endswith('.pth')] == [
        'iter_4.pth', 'iter_5.pth']
    assert [f for f in files if '.cbn_window.' in f] == [
        f'iter_{i}.pth.cbn_window.rank{r}.pt' for i in (4, 5)
        for r in (0, 1)]


def test_resume_with_another_number_of_processes_is_rejected(runs,
                                                             tmp_path):
    """One process resuming a two-process checkpoint: rejected, naming both
    numbers; resume_window=False resumes without the windows."""
    out, _ = runs
    ckpt = str(out / 'first' / f'iter_{AT}.pth')
    cfg = config(tmp_path / 'one', TOTAL, distributed=False)
    with pytest.raises(WindowStateMismatch) as err:
        Runner(**cfg, load_from=ckpt, resume=True).train()
    assert 'saved by 2 processes and this run has 1' in str(err.value)
    assert 'resume_window=False' in str(err.value)
    runner = Runner(**config(tmp_path / 'two', TOTAL, distributed=False,
                             resume_window=False),
                    load_from=ckpt, resume=True)
    runner.train()
    assert runner.iter == TOTAL


def test_a_missing_window_file_is_named(runs, tmp_path):
    """A checkpoint copied without its window files: the error names the
    file the process looked for."""
    out, _ = runs
    ckpt = torch.load(str(out / 'first' / f'iter_{AT}.pth'))
    ckpt['cbn_windows'] = dict(ckpt['cbn_windows'], world_size=1,
                               files=['iter_4.pth.cbn_window.rank0.pt'])
    copied = str(tmp_path / 'iter_4.pth')
    torch.save(ckpt, copied)
    cfg = config(tmp_path / 'work', TOTAL, distributed=False)
    with pytest.raises(WindowStateMismatch) as err:
        Runner(**cfg, load_from=copied, resume=True).train()
    assert ('the window file of process 0, '
            f'{tmp_path}/iter_4.pth.cbn_window.rank0.pt, is missing') in \
        str(err.value)
