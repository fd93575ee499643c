# Copyright (c) mmcbn contributors. All rights reserved.
"""CBNHook in a real mmengine runner, resume, and safe checkpoint loading."""
import os.path as osp
import pickle

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.runner import Runner

import mmcbn
from mmcbn import CBNHook, cbn_layers
from mmcbn.checkpoint import CheckpointError, load_checkpoint_file
from tiny_cbn import RecordCBNIterations, tiny_config


def make_runner(work_dir, max_epochs=3, resume=None, probe=None,
                norm_cfg=None, **kwargs):
    cfg = tiny_config(work_dir, max_epochs, norm_cfg)
    if probe is not None:
        cfg['custom_hooks'].append(probe)
    return Runner(**cfg, load_from=resume, resume=resume is not None,
                  **kwargs)


def test_hook_gives_layers_the_runner_iteration(tmp_path, mmlogs):
    probe = RecordCBNIterations()
    runner = make_runner(tmp_path, max_epochs=3, probe=probe)
    runner.train()
    # 8 images, 2 per iteration: 4 iterations per epoch, burn-in 1.5 epochs
    # (runner.iter is advanced after the after_train_iter hooks)
    assert [it for it, _ in probe.seen] == list(range(12))
    for runner_iter, layers in probe.seen:
        assert len(layers) == 2
        for layer_iter, window in layers:
            assert layer_iter == runner_iter
            assert window == (1 if layer_iter < 6 else 3)
    for _, layer in cbn_layers(runner.model):
        assert layer.burnin_iters == 6
        assert layer.cbn_name in ('conv1.bn', 'conv2.bn')
    summary = [m for m in mmlogs.messages if m.startswith('CBN: ')]
    assert summary == ['CBN: 2 layers: 2 bound | producers: Conv2d x2']
    assert any('CBNHook: 2 CBN layers, window=3, burnin=1.5 epochs '
               '(6 iterations)' in m for m in mmlogs.messages)


def test_resume_mid_burnin_continues_with_the_right_iteration(tmp_path):
    make_runner(tmp_path / 'full', max_epochs=3).train()
    # resume from the end of epoch 1 (iteration 4, inside the 6-iteration
    # burn-in); the checkpoint goes through torch's weights-only loader
    ckpt = str(tmp_path / 'full' / 'epoch_1.pth')
    probe = RecordCBNIterations()
    runner = make_runner(tmp_path / 'resumed', 3, resume=ckpt, probe=probe)
    runner.train()
    iters = [layers[0][0] for _, layers in probe.seen]
    windows = [layers[0][1] for _, layers in probe.seen]
    assert iters == list(range(4, 12))
    assert windows == [1, 1, 3, 3, 3, 3, 3, 3]
    # the resumed run ends where an uninterrupted one ends
    full = torch.load(str(tmp_path / 'full' / 'epoch_3.pth'))
    resumed = torch.load(str(tmp_path / 'resumed' / 'epoch_3.pth'))
    assert full['meta']['iter'] == resumed['meta']['iter'] == 12


class RecordLosses(Hook):
    """The loss of every iteration, as the model returned it."""

    def __init__(self):
        self.losses = []

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.losses.append(float(outputs['loss']))


def test_runner_checkpoint_needs_and_passes_the_allow_list(tmp_path):
    probe = RecordLosses()
    # its own message hub: runners started in the same second share one
    make_runner(tmp_path, max_epochs=1, probe=probe,
                experiment_name=f'allow-list-{tmp_path.name}').train()
    path = osp.join(tmp_path, 'epoch_1.pth')
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    torch.serialization.clear_safe_globals()
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        assert 'mmengine.logging.history_buffer.HistoryBuffer' in unsafe
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path)
    finally:
        mmcbn.register_safe_globals()
    ckpt = torch.load(path)  # default weights_only=True
    assert set(ckpt) >= {'meta', 'state_dict', 'message_hub', 'optimizer'}
    # the loss history unpickled through the allow-list is the one the
    # model returned at each of the 4 iterations (8 images, 2 per batch)
    history, counts = ckpt['message_hub']['log_scalars']['train/loss'].data
    assert len(probe.losses) == 4
    assert history.tolist() == pytest.approx(probe.losses, rel=1e-6)
    assert counts.tolist() == [1] * 4


class NotAllowed:
    pass


def test_allow_list_still_refuses_anything_else(tmp_path):
    path = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {}, 'payload': NotAllowed()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    with pytest.raises(CheckpointError, match='not a readable checkpoint'):
        load_checkpoint_file(path)

    from mmengine.logging.history_buffer import HistoryBuffer

    class Sneaky:
        # an allowed class, but an attribute outside the statistics methods
        def __reduce__(self):
            return (getattr, (HistoryBuffer, '__init__'))

    torch.save({'x': Sneaky()}, path)
    with pytest.raises(pickle.UnpicklingError, match='getattr'):
        torch.load(path)


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    make_runner(tmp_path, max_epochs=1).train()
    good = osp.join(tmp_path, 'epoch_1.pth')
    truncated = str(tmp_path / 'truncated.pth')
    with open(good, 'rb') as f, open(truncated, 'wb') as g:
        g.write(f.read()[:2000])
    text = str(tmp_path / 'notes.pth')
    with open(text, 'w') as f:
        f.write('not a checkpoint\n')
    for path in (truncated, text, str(tmp_path / 'missing.pth')):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint_file(path)
        assert path in str(err.value) and '\n' not in str(err.value)
    assert 'state_dict' in load_checkpoint_file(good)


def test_hook_without_cbn_layers_warns(tmp_path, mmlogs):
    runner = make_runner(tmp_path, max_epochs=1, norm_cfg=dict(type='BN'))
    runner.train()
    assert any('the model has no CBN layer' in m for m in mmlogs.messages)


def test_hook_is_registered_in_root_hooks():
    from mmengine.registry import HOOKS
    assert HOOKS.get('CBNHook') is CBNHook


def test_hook_logs_what_the_upstream_compensation_follows(tmp_path, mmlogs):
    """With compensate='upstream', the binding summary the hook logs after
    the first iteration says which feeding norms were followed (conv2's
    norm is fed by conv1's through a ReLU) and that no path falls back."""
    runner = make_runner(tmp_path, max_epochs=1, norm_cfg=dict(
        type='CBN', window=3, burnin=1, compensate='upstream'))
    runner.train()
    summary = [m for m in mmlogs.messages if m.startswith('CBN: ')]
    assert summary == [
        'CBN: 2 layers: 2 bound | producers: Conv2d x2 | upstream: 1 '
        'feeding norms followed into 1 of 2 layers; no path falls back']
