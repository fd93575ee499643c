# Copyright (c) mmcbn contributors. All rights reserved.
"""SyncCBN: 2 gloo processes equal single-process CBN on the gathered batch.

The defining property (method note, "Across processes"): along an SGD
trajectory in float64, two processes with per-process batches (b0, b1),
wrapped in DDP (gradients averaged), give the same outputs, weights and
running statistics as one process running CBN on the concatenated batch,
whose loss is the average of the two processes' losses.
"""
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_utils import run_and_load, run_processes
from mmcbn import CBN2d, SyncCBN, SyncCBN2d
from tiny_cbn import TwoBlockNet

STEPS = 12
CASES = [
    dict(batches=(2, 2), window=1),
    dict(batches=(2, 2), window=4),
    dict(batches=(1, 3), window=4),
    dict(batches=(2, 2), window=8),
    dict(batches=(3, 0), window=8),  # one process gets no sample at all
    dict(batches=(1, 3), window=4, burnin=3, running_stats_from='window',
         momentum=None),
    # the upstream compensation (n2 is fed by n1 through a ReLU)
    # (the fast form: tests/test_upstream_fast.py)
    dict(batches=(1, 3), window=4, compensate='upstream',
         upstream_form='exact'),
]


def build(case, sync):
    kw = {k: v for k, v in case.items() if k != 'batches'}
    torch.manual_seed(0)
    norm = (lambda c: SyncCBN2d(c, **kw)) if sync else (
        lambda c: CBN2d(c, **kw))
    return TwoBlockNet(norm, (6, 5)).double()


def global_batches(case):
    """The concatenated batch of each step, and the loss coefficients."""
    gen = torch.Generator().manual_seed(5)
    total = sum(case['batches'])
    for step in range(STEPS):
        x = torch.randn(total, 3, 6, 6, generator=gen, dtype=torch.float64)
        x = x * (1 + 0.05 * step) + 0.1 * step
        coef = torch.randn(total, 5, 3, 3, generator=gen,
                           dtype=torch.float64)
        yield x, coef


def loss_of(y, coef, world):
    # sum-based, so a process with no sample contributes 0 (with a graph)
    return ((y * coef).sum() + 0.1 * torch.sin(2 * y).sum()) / world


def train(model, case, rank=None, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    b0 = case['batches'][0]
    outputs = []
    for x, coef in global_batches(case):
        if rank is not None:
            part = slice(0, b0) if rank == 0 else slice(b0, None)
            x, coef = x[part], coef[part]
        y = model(x)
        loss = loss_of(y, coef, world if rank is None else 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        outputs.append(y.detach())
    return outputs


def _worker(rank, world, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP
    results = []
    for case in CASES:
        model = build(case, sync=True)
        ddp = DDP(model, broadcast_buffers=False)
        outputs = train(ddp, case, rank, world)
        results.append(dict(outputs=outputs, state=model.state_dict()))
    torch.save(results, osp.join(out_dir, f'rank{rank}.pt'))


@pytest.fixture(scope='module')
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp('sync_cbn')
    return run_and_load(_worker, out)


@pytest.mark.parametrize('index', range(len(CASES)),
                         ids=[f'{c["batches"]}-w{c["window"]}' +
                              ('-burnin' if 'burnin' in c else '') +
                              ('-' + c.get('upstream_form', 'exact')
                               if 'compensate' in c else '')
                              for c in CASES])
def test_two_processes_equal_cbn_on_the_gathered_batch(
        two_process_results, index):
    case = CASES[index]
    reference = build(case, sync=False)
    ref_out = train(reference, case, world=2)
    b0 = case['batches'][0]
    ranks = [r[index] for r in two_process_results]
    for step, ref in enumerate(ref_out):
        got = torch.cat([ranks[0]['outputs'][step],
                         ranks[1]['outputs'][step]])
        torch.testing.assert_close(
            got, ref, rtol=1e-8, atol=1e-9,
            msg=lambda m: f'step {step}: {m}')
        assert ranks[0]['outputs'][step].shape[0] == b0
    ref_state = reference.state_dict()
    for rank in ranks:
        assert set(rank['state']) == set(ref_state)
        for name, value in ref_state.items():
            torch.testing.assert_close(rank['state'][name], value,
                                       rtol=1e-8, atol=1e-9,
                                       msg=lambda m: f'{name}: {m}')
    # the running statistics are identical on both processes, bit for bit
    for name in ('n1.running_mean', 'n1.running_var', 'n2.running_var',
                 'n2.num_batches_tracked'):
        assert torch.equal(ranks[0]['state'][name], ranks[1]['state'][name])
    if case['window'] > 1 and case['batches'][1]:
        # the window is not a no-op here: CBN differs from SyncBN
        syncbn = build(dict(case, window=1), sync=False)
        diff = max((a - b).abs().max()
                   for a, b in zip(train(syncbn, case, world=2), ref_out))
        assert diff > 1e-3


def test_outside_a_distributed_run_it_is_cbn(mmlogs):
    case = dict(batches=(2, ), window=4)
    sync, plain = build(case, sync=True), build(case, sync=False)
    for a, b in zip(train(sync, case), train(plain, case)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sum('not in a distributed run' in m
               for m in mmlogs.messages) <= 1
    assert SyncCBN is SyncCBN2d


def test_registered_and_eval_is_batchnorm():
    from mmcv.cnn import build_norm_layer
    name, layer = build_norm_layer(dict(type='SyncCBN', window=4), 6)
    assert name == 'bn' and isinstance(layer, SyncCBN2d)
    assert isinstance(layer, CBN2d) and layer.window == 4
    from mmengine.model.weight_init import _get_bases_name
    assert '_BatchNorm' in _get_bases_name(layer)
    layer.running_mean.uniform_()
    layer.eval()
    bn = nn.BatchNorm2d(6)
    bn.load_state_dict(layer.state_dict())
    bn.eval()
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(layer(x), bn(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="process_group must be None or a "
                       "torch.distributed ProcessGroup, got 'world'"):
        SyncCBN2d(4, process_group='world')


def _uneven_worker(rank, world, out_dir):
    """Windows and bindings that differ between the processes."""
    torch.manual_seed(0)
    model = TwoBlockNet(lambda c: SyncCBN2d(c, window=4), (6, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(rank)
    stats = []
    for step in range(8):
        if rank == 0 and step == 5:
            model.n1.reset_window()  # an empty window on one process
        x = torch.randn(2, 3, 6, 6, generator=gen)
        if rank == 1 and step >= 6:
            # bound on rank 0, unbound on rank 1 (a clone between conv
            # and norm): rank 1 falls back and contributes its batch only
            h = model.n1(model.c1(x).clone())
            y = model.n2(model.c2(F.relu(h)))
        else:
            y = model(x)
        (y**2).mean().backward()
        opt.step()
        opt.zero_grad()
        stats.append(model.n1.running_mean.clone())
    assert all(torch.isfinite(s).all() for s in stats)
    torch.save(dict(stats=stats, status=[b.status for b in
                                         model.n1.bindings]),
               osp.join(out_dir, f'uneven{rank}.pt'))


def test_differing_windows_and_bindings_neither_deadlock_nor_diverge(
        tmp_path):
    run_processes(_uneven_worker, 2, (str(tmp_path), ), timeout=300)
    r0, r1 = (torch.load(str(tmp_path / f'uneven{r}.pt')) for r in (0, 1))
    assert r0['status'] == ['bound'] and r1['status'] == ['unbound']
    for a, b in zip(r0['stats'], r1['stats']):
        assert torch.equal(a, b)  # global statistics: identical everywhere


def test_gathered_reference_is_not_trivially_equal():
    """Sanity for the property test: per-process CBN (no sync) on the
    halves differs from CBN on the gathered batch."""
    case = dict(batches=(2, 2), window=4)
    gathered = build(case, sync=False)
    out = train(gathered, case)
    half = build(case, sync=False)
    out_half = train(half, dict(case, batches=(2, 2)), rank=0, world=2)
    assert (out[-1][:2] - out_half[-1]).abs().max() > 1e-3
