# Copyright (c) mmcbn contributors. All rights reserved.
"""SyncCBN in a real process group (2 gloo processes): what a GPU run
relies on and a single process cannot show.

- No host synchronization in a training step (forward, the all-reduce of
  the statistics, backward with its all-reduce of the gradient sums), in
  and after burn-in, in iterations the hook monitors; a host branch on the
  all-reduced counts (a mutation of ``stats_source.py``) is caught.
- Activation checkpointing: the layer cannot bind, so it is SyncBN on the
  global batch, and the recomputation in backward must combine the
  processes too; the conv gradients equal single-process BN on the
  gathered batch, and a local recomputation (a mutation of
  ``_recomputed``) is caught.
- A non-finite batch on one process: the statistics are global, so both
  processes' outputs are non-finite in that iteration (as with SyncBN);
  both skip the running-statistics update and count it; the bad process
  does not store its record, the finite one stores its own; training is
  finite again on both from the next iteration, with identical running
  statistics.
"""
import inspect
import os.path as osp
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointError, checkpoint

from dist_utils import run_and_load
from mmcbn import (SyncCBN2d, read_cbn_flags, read_cbn_health,
                   set_cbn_iteration, set_cbn_monitor)
from sync_counter import SyncCounter
from tiny_cbn import TwoBlockNet

#: The line of AllReduceStats.combine the mutation turns into a host branch.
GUARD = 'total.clamp(min=1)'
SYNC_STEPS = 8
BURNIN = 2
MONITORED = (1, 5)  # in and after burn-in
BAD_STEP = 5


class CountingCollectives(SyncCounter):
    """A SyncCounter that also counts the all-reduces it sees."""

    def __init__(self):
        super().__init__()
        self.all_reduces = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if 'allreduce' in str(func):
            self.all_reduces += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


class _Patched:
    """Replace an attribute for a while (there is no pytest fixture in the
    spawned processes)."""

    def __init__(self, owner, name, value):
        self.owner, self.name, self.value = owner, name, value

    def __enter__(self):
        self.old = self.owner.__dict__[self.name]
        setattr(self.owner, self.name, self.value)

    def __exit__(self, *exc):
        setattr(self.owner, self.name, self.old)


def host_branch_combine():
    """``AllReduceStats.combine`` with its device-side guard turned into a
    host branch on the all-reduced counts (the refactor the test must
    catch)."""
    import mmcbn.stats_source as stats_source
    source = textwrap.dedent(
        inspect.getsource(stats_source.AllReduceStats.combine))
    assert source.count(GUARD) == 1, 'the guarded line changed'
    source = source.replace(
        GUARD, f'(total if bool((total > 0).all()) else {GUARD})')
    namespace = {}
    exec(compile(source, stats_source.__file__, 'exec'),
         vars(stats_source), namespace)
    return namespace['combine']


def average_gradients(model, world):
    """What DDP does after backward (outside the counted step)."""
    for param in model.parameters():
        dist.all_reduce(param.grad)
        param.grad /= world


# ------------------------------------------------ no host synchronization
def sync_counts(rank, world):
    torch.manual_seed(0)
    model = TwoBlockNet(
        lambda c: SyncCBN2d(c, window=4, burnin=BURNIN), (6, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(10 + rank)
    steps, health = [], {}
    for it in range(SYNC_STEPS):
        set_cbn_iteration(model, it)  # what CBNHook does
        set_cbn_monitor(model, it in MONITORED)
        x = torch.randn(2, 3, 6, 6, generator=gen)
        with CountingCollectives() as counter:
            y = model(x)
            loss = (y**2).mean() + y.mean()
            opt.zero_grad()
            loss.backward()
        steps.append(dict(ops=dict(counter.ops),
                          all_reduces=counter.all_reduces))
        average_gradients(model, world)
        opt.step()
        if it in MONITORED:  # the hook's read, once per log interval
            read_cbn_flags(model)
            health[it] = read_cbn_health(model)
    return dict(steps=steps, health=health,
                status=[model.n1.bindings[0].status,
                        model.n2.bindings[0].status],
                filled=len(model.n1._windows[0]))


# --------------------------------------------- activation checkpointing
def global_batches(steps=2):
    gen = torch.Generator().manual_seed(7)
    for step in range(steps):
        x = torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64)
        coef = torch.randn(4, 5, 3, 3, generator=gen, dtype=torch.float64)
        yield x * (1 + 0.2 * step) + 0.3 * step, coef


def loss_of(y, coef):
    return (y * coef).sum() + 0.1 * torch.sin(2 * y).sum()


def checkpointed_forward(model, x, use_reentrant):
    if use_reentrant:
        x = x.requires_grad_()  # else no gradient reaches the weights

    def block1(inp):
        return F.relu(model.n1(model.c1(inp)))

    def block2(h):
        return model.n2(model.c2(h))

    h = checkpoint(block1, x, use_reentrant=use_reentrant)
    return checkpoint(block2, h, use_reentrant=use_reentrant)


def checkpointed_grads(rank, world, use_reentrant):
    """Per step, the conv and norm gradients summed over the processes
    (the gradient of the summed loss), then an SGD step on them."""
    torch.manual_seed(0)
    model = TwoBlockNet(lambda c: SyncCBN2d(c, window=4), (6, 5)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    part = slice(0, 2) if rank == 0 else slice(2, 4)
    grads = []
    for x, coef in global_batches():
        y = checkpointed_forward(model, x[part].clone(), use_reentrant)
        opt.zero_grad()
        loss_of(y, coef[part]).backward()
        for param in model.parameters():
            dist.all_reduce(param.grad)
        grads.append({name: p.grad.clone()
                      for name, p in model.named_parameters()})
        opt.step()
    return dict(grads=grads, status=model.n1.bindings[0].status,
                running_mean=model.n2.running_mean.clone())


def local_recomputation(self, x, source):
    """The mutation: recompute with this process's batch only."""
    return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0,
                        self.eps)


# ------------------------------------------ a non-finite batch on rank 0
def nonfinite_on_rank0(rank, world):
    torch.manual_seed(0)
    model = TwoBlockNet(lambda c: SyncCBN2d(c, window=4), (6, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(20 + rank)
    out = dict(finite=[], any_finite=[], running_mean=[], tracked=[])
    for it in range(8):
        set_cbn_iteration(model, it)
        x = torch.randn(2, 3, 6, 6, generator=gen)
        if it == BAD_STEP and rank == 0:
            x[1, 0, 2, 2] = float('inf')
        y = model(x)
        opt.zero_grad()
        ((y**2).mean() + y.mean()).backward()  # both: the same collectives
        if it != BAD_STEP:  # a non-finite loss: the step is skipped
            average_gradients(model, world)
            opt.step()
        out['finite'].append(bool(torch.isfinite(y).all()))
        out['any_finite'].append(bool(torch.isfinite(y).any()))
        out['running_mean'].append(model.n1.running_mean.clone())
        out['tracked'].append(int(model.n1.num_batches_tracked))
        if it == BAD_STEP:
            out['flags'] = read_cbn_flags(model, warn=False)
            window = model.n1._windows[0]
            slot = window.iterations.index(BAD_STEP)
            out['bad_entry_kept'] = bool(window._buffers['count'][slot] > 0)
    return out


def _worker(rank, world, out_dir):
    from mmcbn.cbn import _CrossIterationBatchNorm
    from mmcbn.stats_source import AllReduceStats
    results = dict(sync=sync_counts(rank, world))
    with _Patched(AllReduceStats, 'combine', host_branch_combine()):
        results['sync_mutated'] = sync_counts(rank, world)
    for reentrant in (False, True):
        results[f'cp_{reentrant}'] = checkpointed_grads(rank, world,
                                                        reentrant)
        with _Patched(_CrossIterationBatchNorm, '_recomputed',
                      local_recomputation):
            try:
                results[f'cp_{reentrant}_local'] = checkpointed_grads(
                    rank, world, reentrant)
            except CheckpointError as err:  # (the same on both processes)
                results[f'cp_{reentrant}_local'] = dict(error=str(err))
    results['nonfinite'] = nonfinite_on_rank0(rank, world)
    torch.save(results, osp.join(out_dir, f'rank{rank}.pt'))


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    return run_and_load(_worker, tmp_path_factory.mktemp('sync_cbn_dist'))


# ------------------------------------------------------------------ tests
def test_training_steps_make_no_host_synchronization(ranks):
    for rank in ranks:
        run = rank['sync']
        assert run['status'] == ['bound', 'bound']
        assert run['filled'] == 3  # the window was full at the end
        for it, step in enumerate(run['steps']):
            assert step['ops'] == {}, (it, step['ops'])
            # the counted step held both layers' forward and backward
            # all-reduces
            assert step['all_reduces'] == 4, (it, step)
        # the monitored iterations computed metrics: after burn-in with a
        # full window (in burn-in the window is not used)
        assert run['health'][1]['window_fill'] == 0
        assert run['health'][5]['window_fill'] == 1
        assert run['health'][5]['comp_mean'] > 0


def test_a_host_branch_in_the_combine_is_caught(ranks):
    """The mutation: ``bool((total > 0).all())`` on the all-reduced counts
    instead of the device-side ``torch.where``: one synchronization per
    layer call, in every step."""
    for rank in ranks:
        for it, step in enumerate(rank['sync_mutated']['steps']):
            assert sum(step['ops'].values()) == 2, (it, step)


def reference_grads():
    """Single-process BN (what the layers fall back to) on the gathered
    batch, with the loss summed over the parts."""
    torch.manual_seed(0)
    model = TwoBlockNet(nn.BatchNorm2d, (6, 5)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = []
    for x, coef in global_batches():
        y = model(x)
        opt.zero_grad()
        (loss_of(y[:2], coef[:2]) + loss_of(y[2:], coef[2:])).backward()
        grads.append({name: p.grad.clone()
                      for name, p in model.named_parameters()})
        opt.step()
    return grads, model.n2.running_mean


@pytest.mark.parametrize('reentrant', [False, True],
                         ids=['non-reentrant', 'reentrant'])
def test_activation_checkpointing_is_syncbn_on_the_global_batch(
        ranks, reentrant):
    reference, running_mean = reference_grads()
    for rank in ranks:
        run = rank[f'cp_{reentrant}']
        assert run['status'] == 'unbound'  # it cannot bind (documented)
        for step, (got, ref) in enumerate(zip(run['grads'], reference)):
            for name in ('c1.weight', 'c2.weight', 'n1.weight'):
                torch.testing.assert_close(
                    got[name], ref[name], rtol=1e-9, atol=1e-11,
                    msg=lambda m: f'step {step} {name}: {m}')
        torch.testing.assert_close(run['running_mean'], running_mean,
                                   rtol=1e-9, atol=1e-12)
        # a recomputation with the local batch (the mutation) is caught:
        # non-reentrant checkpointing sees another graph (a different
        # number of saved tensors) and raises; reentrant checkpointing
        # gives other gradients
        local = rank[f'cp_{reentrant}_local']
        if reentrant:
            diff = local['grads'][0]['c1.weight'] - reference[0]['c1.weight']
            assert diff.abs().max() > 1e-3
        else:
            assert 'different number of tensors' in local['error']


def test_a_nonfinite_batch_on_one_process(ranks):
    r0, r1 = (r['nonfinite'] for r in ranks)
    for run in (r0, r1):
        for it in range(8):
            if it == BAD_STEP:
                # global statistics: no finite output on either process
                assert not run['any_finite'][it]
            else:
                assert run['finite'][it], it
        # the running statistics skip the bad iteration, on both
        assert torch.equal(run['running_mean'][BAD_STEP],
                           run['running_mean'][BAD_STEP - 1])
        assert run['tracked'][BAD_STEP] == run['tracked'][BAD_STEP - 1]
        assert run['tracked'][-1] == 7
    for a, b in zip(r0['running_mean'], r1['running_mean']):
        assert torch.equal(a, b)  # identical on both processes throughout
    # the bad process does not store its record; the other keeps its own
    assert r0['flags']['n1'] == dict(dropped=0, skipped=1, not_stored=1)
    assert r1['flags']['n1'] == dict(dropped=0, skipped=1, not_stored=0)
    assert not r0['bad_entry_kept'] and r1['bad_entry_kept']
    # n2's input is non-finite on both processes (n1's output)
    for run in (r0, r1):
        assert run['flags']['n2'] == dict(dropped=0, skipped=1,
                                          not_stored=1)
