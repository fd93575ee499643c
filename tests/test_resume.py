# Copyright (c) mmcbn contributors. All rights reserved.
"""Exact resume: a run stopped halfway and resumed is the uninterrupted run.

The window state goes into mmengine checkpoints beside the state dict
(CBNHook). A run of N iterations that is stopped at N/2 and resumed must give
bit-identical weights, buffers and optimizer state on the CPU, for the
iteration-based and the epoch-based loop, inside and after burn-in.
"""
import os.path as osp

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

from mmcbn import cbn_layers
from mmcbn.resume import WindowStateMismatch
from tiny_cbn import tiny_config


class Interrupted(Exception):
    pass


@HOOKS.register_module()
class InterruptAt(Hook):
    """Stop training (like a killed job) right after the checkpoint of
    iteration/epoch ``at`` was written."""

    priority = 'LOWEST'

    def __init__(self, at, by_epoch):
        self.at, self.by_epoch = at, by_epoch

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if not self.by_epoch and runner.iter + 1 == self.at:
            raise Interrupted

    def after_train_epoch(self, runner):
        if self.by_epoch and runner.epoch + 1 == self.at:
            raise Interrupted


def run(work_dir, by_epoch, total, norm_cfg, resume=None, hook=None,
        stop=None):
    """Train for ``total`` epochs or iterations, checkpointing every
    ``total // 2``; ``stop`` interrupts after that checkpoint."""
    cfg = tiny_config(work_dir, max_epochs=total, norm_cfg=norm_cfg)
    cfg['param_scheduler'] = dict(type='MultiStepLR', milestones=[3])
    if not by_epoch:
        cfg['train_cfg'] = dict(by_epoch=False, max_iters=total)
        cfg['param_scheduler'] = dict(type='MultiStepLR', milestones=[9],
                                      by_epoch=False)
        cfg['default_hooks']['checkpoint'] = dict(
            type='CheckpointHook', interval=total // 2, by_epoch=False)
    if hook is not None:
        cfg['custom_hooks'][0] = hook
    if stop is not None:
        cfg['custom_hooks'].append(
            dict(type='InterruptAt', at=stop, by_epoch=by_epoch))
    runner = Runner(**cfg, load_from=resume, resume=resume is not None)
    try:
        runner.train()
    except Interrupted:
        assert stop is not None
    return runner


def final_state(runner):
    model = runner.model
    optim = runner.optim_wrapper.state_dict()['state']
    return model.state_dict(), optim


def assert_bit_identical(a, b):
    (sa, oa), (sb, ob) = a, b
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert set(oa) == set(ob)
    for idx in oa:
        for key, value in oa[idx].items():
            assert torch.equal(value, ob[idx][key]), (idx, key)


CASES = {
    # iteration loop, 12 iterations, checkpoint at 6: after / inside burn-in
    'iter-after-burnin': (False, 12, 6, dict(type='CBN', window=3, burnin=2)),
    'iter-inside-burnin': (False, 12, 6, dict(type='CBN', window=4,
                                               burnin=8)),
    # epoch loop, 4 iterations per epoch, burn-in 1.5 epochs (6 iterations)
    # (window 4: the first window after burn-in reaches back before the
    # checkpoint, so the saved entries matter)
    'epoch-inside-burnin': (True, 3, 1, dict(type='CBN', window=4, burnin=1.5,
                                             burnin_by_epoch=True)),
    'epoch-after-burnin': (True, 4, 2, dict(type='CBN', window=3, burnin=1.5,
                                            burnin_by_epoch=True)),
    # upstream compensation: conv2.bn's entries name conv1.bn as feeding
    'iter-upstream': (False, 12, 6, dict(type='CBN', window=3, burnin=2,
                                         compensate='upstream',
                                         upstream_form='exact')),
    'iter-upstream-fast': (False, 12, 6, dict(
        type='CBN', window=3, burnin=2, compensate='upstream',
        upstream_form='fast')),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_resumed_run_is_bit_identical(tmp_path, case):
    by_epoch, total, half, norm_cfg = CASES[case]
    full = run(tmp_path / 'full', by_epoch, total, norm_cfg)
    run(tmp_path / 'first', by_epoch, total, norm_cfg, stop=half)
    name = f'epoch_{half}.pth' if by_epoch else f'iter_{half}.pth'
    ckpt = str(tmp_path / 'first' / name)
    saved = torch.load(ckpt)
    layers = saved['cbn_windows']['ranks'][0]['layers']
    assert set(layers) == {'conv1.bn', 'conv2.bn'}
    if norm_cfg.get('compensate') == 'upstream':
        feed = layers['conv2.bn']['positions'][0]['feed']
        assert [f[1] for f in feed] == ['conv1.bn']
    resumed = run(tmp_path / 'resumed', by_epoch, total, norm_cfg,
                  resume=ckpt)
    assert_bit_identical(final_state(full), final_state(resumed))
    # and without the window state it is not (the test could fail)
    lost = run(tmp_path / 'lost', by_epoch, total, norm_cfg, resume=ckpt,
               hook=dict(type='CBNHook', resume_window=False))
    state, _ = final_state(lost)
    full_state, _ = final_state(full)
    assert not all(torch.equal(state[k], full_state[k]) for k in state)


def test_checkpoint_still_loads_into_plain_bn_and_load_from_starts_empty(
        tmp_path):
    norm_cfg = dict(type='CBN', window=3)
    run(tmp_path / 'a', True, 1, norm_cfg)
    ckpt = str(tmp_path / 'a' / 'epoch_1.pth')
    state = torch.load(ckpt)['state_dict']
    from tiny_cbn import TinyCBNNet
    bn = TinyCBNNet(dict(type='BN'))
    bn.load_state_dict(state, strict=True)
    # load_from (fine-tuning, not resuming): weights, but empty windows
    cfg = tiny_config(tmp_path / 'b', 1, norm_cfg)
    runner = Runner(**cfg, load_from=ckpt, resume=False)
    runner.load_or_resume()
    layers = dict(cbn_layers(runner.model))
    assert set(layers) == {'conv1.bn', 'conv2.bn'}
    for name, layer in layers.items():
        assert all(len(w) == 0 for w in layer._windows)
        assert torch.equal(layer.running_mean, state[name + '.running_mean'])
        assert layer.running_mean.abs().sum() > 0  # really loaded


def test_save_window_false_keeps_checkpoints_bn_sized(tmp_path):
    norm_cfg = dict(type='CBN', window=3)
    run(tmp_path / 'with', True, 1, norm_cfg)
    run(tmp_path / 'without', True, 1, norm_cfg,
        hook=dict(type='CBNHook', save_window=False))
    with_state = torch.load(str(tmp_path / 'with' / 'epoch_1.pth'))
    without = torch.load(str(tmp_path / 'without' / 'epoch_1.pth'))
    assert 'cbn_windows' in with_state and 'cbn_windows' not in without
    size = osp.getsize
    assert size(str(tmp_path / 'with' / 'epoch_1.pth')) > size(
        str(tmp_path / 'without' / 'epoch_1.pth'))


@pytest.mark.parametrize('change,match', [
    (dict(norm_cfg=dict(type='CBN', window=4)),
     "layer 'conv1.bn' has window=3 in the checkpoint and window=4 in the "
     'model'),
    (dict(partial=True),
     "the checkpoint has window state for 'conv2.bn', which is not a CBN "
     'layer of the model'),
    (dict(norm_cfg=dict(type='CBN', window=3, compensate=False)),
     "layer 'conv1.bn' has compensate=True in the checkpoint"),
])
def test_mismatching_window_state_is_rejected_by_name(tmp_path, change,
                                                      match):
    run(tmp_path / 'a', True, 1, dict(type='CBN', window=3))
    ckpt = str(tmp_path / 'a' / 'epoch_1.pth')
    norm_cfg = change.get('norm_cfg', dict(type='CBN', window=3))

    def resume(hook=None):
        cfg = tiny_config(tmp_path / 'b', 2, norm_cfg)
        if change.get('partial'):
            cfg['model']['type'] = 'TinyCBNNetPartial'
        if hook:
            cfg['custom_hooks'][0] = hook
        return Runner(**cfg, load_from=ckpt, resume=True)

    with pytest.raises(WindowStateMismatch) as err:
        resume().train()
    assert match in str(err.value)
    assert 'resume_window=False' in str(err.value)
    assert '\n' not in str(err.value)
    # the user can still resume without the window state
    runner = resume(dict(type='CBNHook', resume_window=False))
    runner.train()
    assert runner.iter == 8


def _write_config(tmp_path, backend, max_keep):
    from mmengine.config import Config
    cfg = tiny_config(tmp_path / 'work', max_epochs=3,
                      norm_cfg=dict(type='CBN', window=3))
    cfg['default_hooks']['checkpoint'] = dict(
        type='CheckpointHook', interval=1, max_keep_ckpts=max_keep,
        backend_args=dict(backend=backend))
    cfg['custom_imports'] = dict(imports=['mmcbn', 'tiny_cbn'],
                                 allow_failed_imports=False)
    path = str(tmp_path / f'config_{backend}.py')
    Config(cfg).dump(path)
    return path


def _train_until_killed_mid_write(tmp_path, backend, max_keep=1):
    """Start tools/train.py, SIGKILL it while epoch_2.pth is being
    written (a real subprocess), return the work dir."""
    import os
    import signal
    import subprocess
    import sys
    import time
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    config = _write_config(tmp_path, backend, max_keep)
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([root, osp.join(root, 'tests')]))
    work = tmp_path / 'work'
    proc = subprocess.Popen(
        [sys.executable, osp.join(root, 'tools', 'train.py'), config],
        env=env, cwd=str(tmp_path), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    marker = work / 'writing.marker'
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, 'the checkpoint write never began'
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    return str(work), config, env, root


def test_sigkill_while_saving_keeps_the_previous_checkpoint(tmp_path):
    """Killed in the middle of writing epoch_2.pth, with max_keep_ckpts=1
    (mmengine removes epoch_1.pth *before* writing epoch_2.pth): the
    previous checkpoint survives and --resume continues from it."""
    import subprocess
    import sys

    from mmcbn.checkpoint import (find_latest_complete_checkpoint,
                                  is_complete_checkpoint)
    work, config, env, root = _train_until_killed_mid_write(
        tmp_path, 'slow_atomic')
    # no torn epoch_2.pth: the new file never replaced anything
    assert not osp.exists(osp.join(work, 'epoch_2.pth'))
    latest = find_latest_complete_checkpoint(work)
    assert latest is not None and is_complete_checkpoint(latest)
    assert osp.basename(latest).startswith('epoch_1.pth')
    assert torch.load(latest)['meta']['iter'] == 4
    # --resume (auto) picks it, and training completes
    proc = subprocess.run(
        [sys.executable, osp.join(root, 'tools', 'train.py'), config,
         '--resume', '--cfg-options',
         'default_hooks.checkpoint.backend_args.backend=mmcbn_atomic'],
        env=env, cwd=str(tmp_path), capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'restored the window state of 2 CBN call positions' in \
        proc.stdout + proc.stderr
    final = torch.load(osp.join(work, 'epoch_3.pth'))
    assert final['meta']['iter'] == 12


def test_sigkill_with_plain_writes_loses_the_run(tmp_path):
    """The control: mmengine's in-place writes, killed at the same point,
    leave a torn epoch_2.pth and no complete checkpoint at all."""
    from mmcbn.checkpoint import (find_latest_complete_checkpoint,
                                  is_complete_checkpoint)
    work, *_ = _train_until_killed_mid_write(tmp_path, 'slow_plain')
    assert osp.exists(osp.join(work, 'epoch_2.pth'))
    assert not is_complete_checkpoint(osp.join(work, 'epoch_2.pth'))
    assert not osp.exists(osp.join(work, 'epoch_1.pth'))
    assert find_latest_complete_checkpoint(work) is None
