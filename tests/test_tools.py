# Copyright (c) mmcbn contributors. All rights reserved.
"""tools/train.py and tools/dist_train.sh on this CPU machine."""
import json
import math
import os
import os.path as osp
import re
import socket
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TESTS = osp.join(ROOT, 'tests')
sys.path.insert(0, osp.join(ROOT, 'tools'))


def write_config(tmp_path, **overrides):
    from tiny_cbn import tiny_config
    cfg = tiny_config(tmp_path / 'work', **overrides)
    cfg['custom_imports'] = dict(
        imports=['mmcbn', 'tiny_cbn'], allow_failed_imports=False)
    cfg['custom_hooks'].append(dict(type='RecordCBNIterations', dump=True))
    path = str(tmp_path / 'tiny_cbn_config.py')
    Config(cfg).dump(path)
    return path


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_dist_train_two_gloo_processes(tmp_path):
    config = write_config(tmp_path, max_epochs=2)
    env = dict(os.environ, PORT=str(free_port()), OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([ROOT, TESTS]),
               PYTHON=sys.executable)
    proc = subprocess.run(
        ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), config, '2'],
        env=env, cwd=str(tmp_path), capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    work = tmp_path / 'work'
    # 8 images over 2 ranks, 2 per rank: 2 iterations per epoch
    ckpt = torch.load(str(work / 'epoch_2.pth'))
    assert ckpt['meta']['iter'] == 4
    assert "backend='gloo'" in ckpt['meta']['cfg']
    ranks = []
    for rank in (0, 1):
        with open(work / f'cbn_iters_rank{rank}.json') as f:
            ranks.append(json.load(f))
    for record in ranks:
        iters = [layers[0][0] for _, layers in record['seen']]
        assert iters == [0, 1, 2, 3]
        # burn-in of 1.5 epochs = 3 iterations at 2 iterations per epoch
        assert [layers[0][1] for _, layers in record['seen']] == [1, 1, 1, 3]
    # each rank kept statistics of its own batches
    assert ranks[0]['window_means'] != ranks[1]['window_means']
    # rank 0 alone wrote checkpoints
    assert sorted(p for p in os.listdir(work) if p.endswith('.pth')) == [
        'epoch_1.pth', 'epoch_2.pth']
    # ... and each process its window state beside each checkpoint, which
    # lists the files: a resume gives every process its own windows
    files = ckpt['cbn_windows']['files']
    assert files == [f'epoch_2.pth.cbn_window.rank{r}.pt' for r in (0, 1)]
    means = [torch.load(str(work / name))['windows']['layers']['conv1.bn']
             ['positions'][0]['buffers']['raw_mean'] for name in files]
    assert means[0].shape == means[1].shape and not torch.equal(*means)
    proc = subprocess.run(
        ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), config, '2',
         '--resume', '--cfg-options', 'train_cfg.max_epochs=3'],
        env=dict(env, PORT=str(free_port())), cwd=str(tmp_path),
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # (only rank 0 logs below ERROR; a rank that could not restore its own
    # windows would fail the run)
    assert 'restored the window state of 2 CBN call' in proc.stdout + \
        proc.stderr
    assert torch.load(str(work / 'epoch_3.pth'))['meta']['iter'] == 6


def test_train_amp_then_resume_from_cli(tmp_path):
    import train
    config = write_config(tmp_path, max_epochs=1)
    train.main([config, '--amp', '--work-dir', str(tmp_path / 'work')])
    ckpt = torch.load(str(tmp_path / 'work' / 'epoch_1.pth'))
    assert ckpt['meta']['iter'] == 4
    assert 'CPUAutocastOptimWrapper' in ckpt['meta']['cfg']
    with open(tmp_path / 'work' / 'cbn_iters_rank0.json') as f:
        assert [layers[0][0] for _, layers in json.load(f)['seen']] == [
            0, 1, 2, 3]
    # --resume (auto) picks the latest checkpoint and continues to epoch 2
    train.main([
        config, '--resume', '--work-dir',
        str(tmp_path / 'work'), '--cfg-options', 'train_cfg.max_epochs=2'
    ])
    with open(tmp_path / 'work' / 'cbn_iters_rank0.json') as f:
        record = json.load(f)
    assert [layers[0][0] for _, layers in record['seen']] == [4, 5, 6, 7]
    assert torch.load(str(tmp_path / 'work' / 'epoch_2.pth'))['meta'][
        'iter'] == 8


def test_resume_path_must_exist(tmp_path):
    import train
    config = write_config(tmp_path)
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        train.main([config, '--resume', str(tmp_path / 'nope.pth')])


def test_dist_train_synccbn_demo_config_on_two_cpu_processes(tmp_path):
    """bash tools/dist_train.sh <SyncCBN demo config> 2 trains on this CPU:
    finite losses, and both processes end with identical weights and
    running statistics (the statistics are global)."""
    import make_demo_data
    data = tmp_path / 'data'
    make_demo_data.generate(str(data), seed=0, num_train=8, num_val=2,
                            size=64, verbose=False)
    base = osp.join(ROOT, 'configs', 'demo', 'fcn_r18-d8_synccbn_demo.py')
    config = tmp_path / 'synccbn_demo_test.py'
    config.write_text(
        f'_base_ = {base!r}\n'
        "custom_imports = dict(imports=['mmcbn', 'tiny_cbn'],\n"
        '                      allow_failed_imports=False)\n'
        'norm_cfg = dict(type="SyncCBN", window=3, burnin=2)\n'
        'model = dict(data_preprocessor=dict(size=(64, 64)),\n'
        '             backbone=dict(norm_cfg=norm_cfg),\n'
        '             decode_head=dict(norm_cfg=norm_cfg),\n'
        '             auxiliary_head=dict(norm_cfg=norm_cfg))\n'
        "custom_hooks = [dict(type='CBNHook'),\n"
        "                dict(type='DumpModelState')]\n"
        f"train_dataloader = dict(num_workers=0, dataset=dict(\n"
        f"    data_root={str(data / 'seg') + '/'!r},\n"
        "    pipeline=[dict(type='LoadImageFromFile'),\n"
        "              dict(type='LoadAnnotations'),\n"
        "              dict(type='RandomCrop', crop_size=(64, 64)),\n"
        "              dict(type='PackSegInputs')]))\n"
        'train_cfg = dict(max_iters=6, val_interval=100)\n'
        'val_dataloader = None\nval_cfg = None\nval_evaluator = None\n'
        'default_hooks = dict(logger=dict(interval=1),\n'
        '                     checkpoint=dict(interval=6))\n')
    env = dict(os.environ, PORT=str(free_port()), OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([ROOT, TESTS]),
               PYTHON=sys.executable)
    proc = subprocess.run(
        ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), str(config), '2',
         '--work-dir', str(tmp_path / 'work')],
        env=env, cwd=str(tmp_path), capture_output=True, text=True,
        timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    losses = [float(v) for v in
              re.findall(r' loss: ([-\d.e+naninf]+)', output)]
    assert len(losses) >= 6 and all(map(math.isfinite, losses)), losses
    states = [torch.load(str(tmp_path / 'work' / f'state_rank{r}.pth'))
              for r in (0, 1)]
    running = [k for k in states[0] if k.endswith('running_var')]
    assert len(running) >= 20
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    # the SyncCBN layers really ran distributed with windows
    assert 'not in a distributed run' not in output
    assert 'CBNHook: ' in output


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason='checks what the script does without CUDA')
def test_gpu_check_refuses_a_python_without_cuda(tmp_path):
    """tools/gpu_check.sh run is for a GPU loan: without CUDA it stops
    before any step (exit 2, saying why), after writing what machine it
    found; an unknown mode is a usage error."""
    script = osp.join(ROOT, 'tools', 'gpu_check.sh')
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(['bash', script, 'run'], env=env, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert 'CUDA is not available to this Python' in proc.stderr
    assert '== tests' not in proc.stdout
    machine = (tmp_path / 'machine.txt').read_text()
    assert f'torch {torch.__version__}' in machine
    assert 'available False' in machine
    proc = subprocess.run(['bash', script, 'check'], env=env, text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 2 and 'usage:' in proc.stderr
