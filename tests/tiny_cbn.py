# Copyright (c) mmcbn contributors. All rights reserved.
"""Tiny models (a plain two-block net, and a CBN model, dataset and probe
hook for runner-level tests).

Registered in mmengine's root registries, so configs (and the processes
torchrun starts) can use them with ``custom_imports=['tiny_cbn']``.
"""
import json
import os.path as osp
import time

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, HOOKS, MODELS
from torch import nn
from torch.utils.data import Dataset

from mmcbn import cbn_layers


class TwoBlockNet(nn.Module):
    """Two conv + norm blocks (with and without conv bias, a stride), the
    norm layers built by ``norm(channels)``."""

    def __init__(self, norm, widths=(8, 6)):
        super().__init__()
        self.c1 = nn.Conv2d(3, widths[0], 3, padding=1)
        self.n1 = norm(widths[0])
        self.c2 = nn.Conv2d(widths[0], widths[1], 3, stride=2, padding=1,
                            bias=False)
        self.n2 = norm(widths[1])

    def forward(self, x):
        return self.n2(self.c2(torch.relu(self.n1(self.c1(x)))))


@MODELS.register_module()
class TinyCBNNet(BaseModel):

    def __init__(self, norm_cfg):
        # mmcv is imported here, so that the tests that only need
        # TwoBlockNet run where only torch and mmengine are installed
        from mmcv.cnn import ConvModule
        super().__init__()
        self.conv1 = ConvModule(3, 8, 3, padding=1, norm_cfg=norm_cfg)
        self.conv2 = ConvModule(
            8, 8, 3, stride=2, padding=1, norm_cfg=norm_cfg)
        self.head = nn.Linear(8, 2)

    def forward(self, inputs, labels=None, mode='tensor'):
        feats = self.conv2(self.conv1(inputs)).mean((2, 3))
        logits = self.head(feats)
        if mode == 'loss':
            return dict(loss=nn.functional.cross_entropy(logits, labels))
        return logits


@DATASETS.register_module()
class RandomImages(Dataset):
    metainfo = dict(classes=('a', 'b'))

    def __init__(self, n=8):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 8, 8, generator=gen)
        self.y = torch.randint(0, 2, (n, ), generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(inputs=self.x[i], labels=self.y[i])


@HOOKS.register_module()
class RecordCBNIterations(Hook):
    """Records what every CBN layer believed after each iteration; with
    ``dump=True`` writes it to ``work_dir/cbn_iters_rank{rank}.json``."""

    priority = 'LOWEST'

    def __init__(self, dump=False):
        self.seen = []
        self.dump = dump

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.seen.append((runner.iter, [(layer.iteration,
                                         layer.window_at(layer.iteration))
                                        for _, layer in cbn_layers(
                                            runner.model)]))

    def after_train(self, runner):
        if self.dump:
            # (None: nothing recorded yet; burn-in records only its last
            # window - 1 iterations)
            means = [
                layer._windows[0]._buffers['a_mean'].sum().item()
                if 'a_mean' in layer._windows[0]._buffers else None
                for _, layer in cbn_layers(runner.model)
            ]
            path = osp.join(runner.work_dir, f'cbn_iters_rank{get_rank()}'
                            '.json')
            with open(path, 'w') as f:
                json.dump(dict(seen=self.seen, window_means=means), f)


def tiny_config(work_dir, max_epochs=3, norm_cfg=None, extra_hooks=()):
    """A runner config training TinyCBNNet on RandomImages."""
    norm_cfg = norm_cfg or dict(
        type='CBN', window=3, burnin=1.5, burnin_by_epoch=True)
    return dict(
        model=dict(type='TinyCBNNet', norm_cfg=norm_cfg),
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=dict(type='RandomImages'),
            batch_size=2,
            num_workers=0,
            sampler=dict(type='DefaultSampler', shuffle=True),
            collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        param_scheduler=dict(type='MultiStepLR', milestones=[2]),
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=1),
            logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[dict(type='CBNHook'), *extra_hooks],
        randomness=dict(seed=0),
        default_scope=None)


@MODELS.register_module()
class TinyCBNNetPartial(TinyCBNNet):
    """TinyCBNNet whose second norm is plain BN (another layer set)."""

    def __init__(self, norm_cfg):
        from mmcv.cnn import ConvModule
        super().__init__(norm_cfg)
        self.conv2 = ConvModule(
            8, 8, 3, stride=2, padding=1, norm_cfg=dict(type='BN'))


#: The checkpoint the slow test backends write slowly.
SLOW_NAME = 'epoch_2.pth'


def _slow_write(f, data, filepath):
    """Write a quarter, say so in a marker file, then stall (a test kills
    the process here), then write the rest."""
    if not str(filepath).endswith(SLOW_NAME):
        f.write(data)
        return
    f.write(data[:len(data) // 4])
    f.flush()
    with open(osp.join(osp.dirname(str(filepath)), 'writing.marker'),
              'w') as marker:
        marker.write(str(filepath))
    time.sleep(120)
    f.write(data[len(data) // 4:])


def _register_slow_backends():
    from mmengine.fileio import LocalBackend, register_backend

    from mmcbn.checkpoint import AtomicLocalBackend

    class SlowAtomic(AtomicLocalBackend):
        """mmcbn's atomic backend, writing SLOW_NAME slowly."""

        def _write(self, filepath, data):
            self._write_data = lambda f, d: _slow_write(f, d, filepath)
            super()._write(filepath, data)

    class SlowPlain(LocalBackend):
        """mmengine's plain local backend (writes in place), slowly."""

        def put(self, obj, filepath):
            with open(filepath, 'wb') as f:
                _slow_write(f, obj, filepath)

    register_backend('slow_atomic', SlowAtomic, force=True)
    register_backend('slow_plain', SlowPlain, force=True)


_register_slow_backends()


@HOOKS.register_module()
class DumpModelState(Hook):
    """Writes each process's final model state (and the CBN layers'
    running statistics) to ``work_dir/state_rank{rank}.pth``."""

    priority = 'LOWEST'

    def after_train(self, runner):
        model = runner.model.module if hasattr(runner.model, 'module') \
            else runner.model
        torch.save({k: v.detach().cpu() for k, v in
                    model.state_dict().items()},
                   osp.join(runner.work_dir, f'state_rank{get_rank()}.pth'))
