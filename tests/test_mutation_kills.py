# Copyright (c) mmcbn contributors. All rights reserved.
"""Tests written to kill mutants that the suite let survive.

See docs/advanced_guides/mutation_testing.md for the campaign.
"""
import pytest
import torch
import torch.distributed as dist

from mmcbn.stats_source import LOCAL, AllReduceStats


# ------------------------------------------------------------ stats_source
class _FakeWorld:
    """``dist.all_reduce`` of a world of two in one process: the other
    process's contribution is recorded first (``record``), then added to
    this process's tensor (``add``). Checks the op, the group and that the
    tensor is contiguous (gloo and NCCL need it)."""

    def __init__(self, group):
        self.group = group
        self.recorded = []
        self.pending = []
        self.calls = 0

    def record(self, tensor, op=None, group=None):
        self._check(tensor, op, group)
        self.recorded.append(tensor.clone())

    def add(self, tensor, op=None, group=None):
        self._check(tensor, op, group)
        tensor.add_(self.pending.pop(0))

    def _check(self, tensor, op, group):
        self.calls += 1
        assert op == dist.ReduceOp.SUM
        assert group is self.group
        assert tensor.is_contiguous()


def _pooled(parts):
    """count, mean, biased var of the union of the processes' samples, per
    entry, from each process's (count, mean, var)."""
    n = sum(c for c, _, _ in parts)
    s1 = sum(c[:, None] * m for c, m, _ in parts)
    s2 = sum(c[:, None] * (v + m * m) for c, m, v in parts)
    safe = torch.where(n > 0, n, torch.ones_like(n))[:, None]
    mean = s1 / safe
    return n, mean, s2 / safe - mean * mean


def _two_processes(monkeypatch, parts, shift=None, group='g'):
    """Run ``AllReduceStats.combine`` as process 1 and then process 0 of a
    world of two; return process 0's result."""
    world = _FakeWorld(group)
    monkeypatch.setattr(dist, 'all_reduce', world.record)
    AllReduceStats(group, shift).combine(*parts[1])
    world.pending = list(world.recorded)
    monkeypatch.setattr(dist, 'all_reduce', world.add)
    out = AllReduceStats(group, shift).combine(*parts[0])
    assert world.calls == 2  # one collective per combine
    return out


def _parts():
    g = torch.Generator().manual_seed(3)
    # entries: both count, only process 0, only process 1, neither
    c0 = torch.tensor([4., 6., 0., 0.], dtype=torch.float64)
    c1 = torch.tensor([2., 0., 5., 0.], dtype=torch.float64)
    parts = []
    for c in (c0, c1):
        mean = torch.randn(4, 3, generator=g, dtype=torch.float64) * 3 + 5
        var = torch.rand(4, 3, generator=g, dtype=torch.float64) + 0.1
        parts.append((c, mean, var))
    # a compensated entry may have a negative variance: kept as it is
    parts[0][2][0, 1] = -0.05
    return parts


@pytest.mark.parametrize('shift', [None, 'near', 'far'])
def test_all_reduce_stats_pools_the_processes_samples(monkeypatch, shift):
    parts = _parts()
    if shift == 'near':
        shift = parts[0][1][0].clone()
    elif shift == 'far':
        shift = torch.full((3, ), -40., dtype=torch.float64)
    n, mean, var = _pooled(parts)
    # entries a process does not count carry garbage: it must not leak
    garbage = [(c, torch.where(c[:, None] > 0, m, float('nan')),
                torch.where(c[:, None] > 0, v, float('inf')))
               for c, m, v in parts]
    count, got_mean, got_var = _two_processes(monkeypatch, garbage, shift)
    torch.testing.assert_close(count, n)
    used = n > 0
    torch.testing.assert_close(got_mean[used], mean[used])
    torch.testing.assert_close(got_var[used], var[used])
    # an entry no process counts: zero count, finite statistics
    assert count[3] == 0
    assert torch.isfinite(got_mean[3]).all() and torch.isfinite(
        got_var[3]).all()
    assert (got_var[3] == 0).all()
    # the negative compensated variance survives the combination (the
    # repair max(., 0) is the window average's, after combining)
    alone = _two_processes(
        monkeypatch, [parts[0], (torch.zeros(4, dtype=torch.float64),
                                 parts[1][1], parts[1][2])], shift)
    assert alone[2][0, 1] < 0
    torch.testing.assert_close(alone[2][0, 1],
                               torch.tensor(-0.05, dtype=torch.float64))
    torch.testing.assert_close(alone[1][:2], parts[0][1][:2])


def test_all_reduce_stats_shift_keeps_float32_from_cancelling(monkeypatch):
    """A channel whose mean is large against its spread: about a shift near
    the mean the float32 variance is right; about 0 it cancels."""
    c = torch.tensor([1000.])
    parts = [(c, torch.full((1, 1), 3000.), torch.full((1, 1), 1e-2)),
             (c, torch.full((1, 1), 3000.), torch.full((1, 1), 1e-2))]
    _, _, var = _two_processes(monkeypatch, parts,
                               shift=torch.full((1, ), 2999.))
    torch.testing.assert_close(var, torch.full((1, 1), 1e-2), rtol=1e-3,
                               atol=0)
    _, _, var0 = _two_processes(monkeypatch, parts, shift=None)
    assert (var0 - 1e-2).abs().item() > 1e-3  # why the shift exists
    # a shift held in another dtype (float64 running statistics) does not
    # change the entries' dtype
    shift64 = torch.full((1, ), 2999., dtype=torch.float64)
    count, mean, var = _two_processes(monkeypatch, parts, shift=shift64)
    assert count.dtype == mean.dtype == var.dtype == torch.float32


def test_all_reduce_stats_sums_gradients_over_processes(monkeypatch):
    world = _FakeWorld('g')
    other = torch.arange(6.)
    world.pending = [other]
    monkeypatch.setattr(dist, 'all_reduce', world.add)
    sums = torch.arange(12.).view(6, 2).t()[0]  # not contiguous
    out = AllReduceStats('g').sum_grad(sums)
    torch.testing.assert_close(out, torch.arange(0., 12., 2.) + other)
    assert world.calls == 1
    assert AllReduceStats.distributed and not LOCAL.distributed
    one = torch.ones(3)
    assert LOCAL.sum_grad(one) is one
    c, m, v = torch.ones(2), torch.zeros(2, 3), torch.ones(2, 3)
    assert all(a is b for a, b in zip(LOCAL.combine(c, m, v), (c, m, v)))


# ------------------------------------------------------------------ resume
def _trained_net(steps=3, window=3):
    """conv -> CBN trained ``steps`` iterations: a filled window."""
    from torch import nn

    from mmcbn import CBN2d, set_cbn_iteration
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), CBN2d(3, window=window))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for it in range(steps):
        set_cbn_iteration(net, it)
        net(torch.randn(4, 2, 3, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return net


def _mismatch(net, state):
    from mmcbn.resume import WindowStateMismatch, check_window_state
    with pytest.raises(WindowStateMismatch) as err:
        check_window_state(net, state)
    return str(err.value)


def test_window_state_mismatches_are_named():
    import copy

    from mmcbn.resume import VERSION, collect_window_state
    net = _trained_net()
    state = collect_window_state(net)
    pos = state['layers']['1']['positions'][0]
    assert pos['key'][1] == '0.weight' and pos['key'][3] == '0.bias'

    bad = dict(state, version=VERSION + 6)
    assert f'(version {VERSION + 6!r}, expected {VERSION})' in _mismatch(
        net, bad)
    assert '(version None, expected' in _mismatch(net, ['not a dict'])

    bad = copy.deepcopy(state)
    bad['layers']['other'] = bad['layers'].pop('1')
    assert _mismatch(net, bad) == (
        "the model has CBN layer '1', the checkpoint has no window state "
        'for it')

    # a position that holds nothing, then one fed by an unknown parameter:
    # every position is checked, not only those up to the first empty one
    for empty in (None, dict(pos, key=None)):
        bad = copy.deepcopy(state)
        bad['layers']['1']['positions'] = [
            empty, dict(pos, key=(pos['key'][0], '9.weight') + pos['key'][2:])
        ]
        assert _mismatch(net, bad) == (
            "layer '1' (call 1) was fed by parameter '9.weight', which the "
            'model does not have')
    bad = copy.deepcopy(state)
    bad['layers']['1']['positions'][0]['key'] = pos['key'][:3] + (
        '9.bias', ) + pos['key'][4:]
    assert "parameter '9.bias'" in _mismatch(net, bad)

    # a producer weight of another shape
    bad = copy.deepcopy(state)
    key = list(pos['key'])
    key[2] = (3, 2, 3, 3)
    bad['layers']['1']['positions'][0]['key'] = tuple(key)
    assert _mismatch(net, bad) == (
        "layer '1' (call 0) was fed by '0.weight' of shape (3, 2, 3, 3); in "
        'the model it has shape (3, 2, 1, 1)')
    # statistics of another number of channels
    bad = copy.deepcopy(state)
    buffers = bad['layers']['1']['positions'][0]['buffers']
    buffers['a_mean'] = torch.zeros(buffers['a_mean'].shape[0], 5)
    assert _mismatch(net, bad) == (
        "layer '1' (call 0) holds statistics of 5 channels, the model 3")
    # a frozen producer's key has no weight name: nothing to compare
    bad = copy.deepcopy(state)
    key[1] = None
    bad['layers']['1']['positions'][0]['key'] = tuple(key)
    from mmcbn.resume import check_window_state
    check_window_state(net, bad)


def test_window_state_round_trips_through_names():
    """The saved key names parameters; the restored key holds this model's
    parameter ids again, and the restored window is used as it was."""
    import copy

    from mmcbn import set_cbn_iteration
    from mmcbn.resume import collect_window_state, restore_window_state
    net = _trained_net()
    state = copy.deepcopy(collect_window_state(net))
    other = _trained_net(steps=0)
    other.load_state_dict(net.state_dict())
    assert restore_window_state(other, state) == 1
    window = other[1]._windows[0]
    conv = other[0]
    assert window.key[1] == id(conv.weight) and window.key[3] == id(
        conv.bias)
    assert window.iterations == net[1]._windows[0].iterations
    assert other[1].iteration == net[1].iteration
    assert other[1]._external_iteration is net[1]._external_iteration
    x = torch.randn(4, 2, 3, 3)
    for model in (net, other):
        set_cbn_iteration(model, 3)
    torch.testing.assert_close(other(x), net(x), rtol=0, atol=0)


# ------------------------------------------------------------------ CBNHook
def test_rank_file_names_the_checkpoint_and_the_rank():
    from mmcbn.hooks.cbn_hook import rank_file
    assert rank_file('/w/epoch_2.pth', 3) == \
        '/w/epoch_2.pth.cbn_window.rank3.pt'
    assert rank_file('/w/epoch_2.pth.superseded', 0) == \
        '/w/epoch_2.pth.cbn_window.rank0.pt'


def test_hook_option_errors_name_the_option():
    from mmcbn import CBNHook
    for name in ('log_bindings', 'health', 'save_window', 'resume_window',
                 'atomic_checkpoints', 'health_by_group'):
        with pytest.raises(ValueError) as err:
            CBNHook(**{name: 1})
        assert str(err.value) == \
            f'CBNHook {name} must be True or False, got 1'


class _Runner:
    """The little of mmengine's Runner that the hook's methods read."""

    def __init__(self, model=None, **kw):
        import logging
        self.model = model
        self.logger = logging.getLogger('mutation_kills')
        self.hooks = []
        self.iter = 0
        self.__dict__.update(kw)


def test_compile_detection():
    from mmengine.config import Config

    from mmcbn.hooks.cbn_hook import _compiles
    assert not _compiles(_Runner())
    assert _compiles(_Runner(_compile=True))
    assert _compiles(_Runner(cfg=Config(dict(compile=dict()))))
    assert _compiles(_Runner(cfg=Config(dict(compile=True))))
    assert not _compiles(_Runner(cfg=Config(dict(compile=False))))
    assert not _compiles(_Runner(cfg=Config(dict())))


def test_before_run_of_a_test_run_does_nothing(caplog):
    """``runner.test()`` calls before_run with the optimizer wrapper still
    a config dict: no accumulation to set, and no warning."""
    import logging

    from mmcbn import CBNHook
    runner = _Runner(_trained_net(steps=0), optim_wrapper=dict(
        optimizer=dict(type='SGD', lr=0.1)))
    with caplog.at_level(logging.INFO, logger='mutation_kills'):
        CBNHook(window_unit='cycle').before_run(runner)
    assert caplog.records == []


def test_atomic_checkpoints_switch_the_checkpoint_backend():
    from mmcbn import CBNHook

    class CheckpointHook:
        backend_args = None
        file_client_args = None
        out_dir = None

    class Loader(list):
        pass

    ckpt = CheckpointHook()
    runner = _Runner(_trained_net(steps=0), hooks=[ckpt],
                     train_dataloader=Loader([0] * 4), work_dir='/w')
    CBNHook().before_train(runner)
    assert ckpt.backend_args == dict(backend='mmcbn_atomic')
    ckpt.backend_args = None
    CBNHook(atomic_checkpoints=False).before_train(runner)
    assert ckpt.backend_args is None


def test_default_interval_without_a_logger_hook_is_50():
    from mmcbn import CBNHook
    hook = CBNHook()
    logs = [it for it in range(120)
            if hook._logs_this_iter(_Runner(iter=it), it)]
    assert logs == [49, 99]
    hook = CBNHook(interval=30)
    logs = [it for it in range(120)
            if hook._logs_this_iter(_Runner(iter=it), it)]
    assert logs == [29, 59, 89, 119]


def test_failures_are_counted_over_the_processes(monkeypatch):
    from mmcbn.hooks import cbn_hook
    assert cbn_hook.CBNHook._count_failures(True) == 0  # one process
    others = []

    def all_reduce(flags):
        assert flags.dtype == torch.int64 and flags.shape == (1, )
        flags += others.pop(0)

    monkeypatch.setattr(cbn_hook, '_multi_process', lambda: True)
    monkeypatch.setattr(cbn_hook, 'all_reduce', all_reduce)
    for failed, other, expected in [(False, 0, 0), (False, 2, 2),
                                    (True, 0, 0), (True, 3, 3)]:
        others.append(other)
        assert cbn_hook.CBNHook._count_failures(failed) == expected


def _rank_setup(monkeypatch, tmp_path, world, rank):
    from mmcbn.hooks import cbn_hook
    monkeypatch.setattr(cbn_hook, '_multi_process', lambda: world > 1)
    monkeypatch.setattr(cbn_hook, 'get_world_size', lambda: world)
    monkeypatch.setattr(cbn_hook, 'get_rank', lambda: rank)
    monkeypatch.setattr(cbn_hook, 'barrier', lambda: None)


def test_each_process_saves_and_reads_its_own_window_file(monkeypatch,
                                                          tmp_path):
    """Several processes: each writes its window beside the checkpoint
    and, on resume, reads back its own file (found beside the checkpoint
    being loaded, or ``load_from``)."""
    from mmengine.fileio import LocalBackend

    from mmcbn import CBNHook
    from mmcbn.hooks import cbn_hook
    from mmcbn.resume import WindowStateMismatch

    class CheckpointHook:
        out_dir = str(tmp_path)
        filename_tmpl = 'iter_{}.pth'
        file_backend = LocalBackend()

    nets = [_trained_net(steps=2), _trained_net(steps=3)]
    saved = []
    for rank, net in enumerate(nets):
        _rank_setup(monkeypatch, tmp_path, 2, rank)
        hook = CBNHook()
        runner = _Runner(net, timestamp='t0', iter=5)
        hook._save_rank_windows(runner, CheckpointHook(), 6)
        assert hook._saved['files'] == [
            'iter_6.pth.cbn_window.rank0.pt',
            'iter_6.pth.cbn_window.rank1.pt'
        ]
        payload = cbn_hook._read_window_file(
            str(tmp_path / f'iter_6.pth.cbn_window.rank{rank}.pt'))
        assert payload['rank'] == rank and payload['world_size'] == 2
        assert payload['token'] == ('t0', 5)
        checkpoint = {}
        hook.before_save_checkpoint(runner, checkpoint)
        saved.append(checkpoint[cbn_hook.CKPT_KEY])
    assert saved[0] == saved[1]
    (tmp_path / 'iter_6.pth').write_bytes(b'')
    for rank, net in enumerate(nets):
        _rank_setup(monkeypatch, tmp_path, 2, rank)
        runner = _Runner(net, _load_from=str(tmp_path / 'iter_6.pth'))
        state = CBNHook()._own_state(runner, saved[0])
        assert state['layers']['1']['iteration'] == net[1].iteration
        assert state['layers']['1']['iteration'] == rank + 1
    # another world size, or another process's file
    _rank_setup(monkeypatch, tmp_path, 3, 0)
    with pytest.raises(WindowStateMismatch, match='saved by 2 processes '
                       'and this run has 3'):
        CBNHook()._own_state(runner, saved[0])
    _rank_setup(monkeypatch, tmp_path, 2, 1)
    wrong = dict(saved[0], files=list(reversed(saved[0]['files'])))
    with pytest.raises(WindowStateMismatch, match='belongs to another'):
        CBNHook()._own_state(runner, wrong)


def test_stale_window_files_are_removed(monkeypatch, tmp_path):
    """A process's window files whose checkpoint is gone are deleted; the
    files of a kept or superseded checkpoint, of other processes, and the
    one just written stay."""
    from mmcbn import CBNHook
    _rank_setup(monkeypatch, tmp_path, 2, 1)
    names = ['a.pth', 'b.pth.superseded']
    for name in names:
        (tmp_path / name).write_bytes(b'')
    files = {
        'a.pth.cbn_window.rank1.pt': True,  # its checkpoint exists
        'b.pth.cbn_window.rank1.pt': True,  # set aside, not gone
        'c.pth.cbn_window.rank1.pt': False,  # gone
        'c.pth.cbn_window.rank0.pt': True,  # another process's
        'd.pth.cbn_window.rank1.pt': True,  # kept
        'notes.txt': True,
    }
    for name in files:
        (tmp_path / name).write_bytes(b'x')
    hook = CBNHook()
    hook._window_dirs = [str(tmp_path)]
    hook._remove_stale_files(keep='d.pth.cbn_window.rank1.pt')
    for name, kept in files.items():
        assert (tmp_path / name).exists() == kept, name


# --------------------------------------------------------------- functional
def _fake_cuda():
    import sys
    import os.path as osp
    sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
    import fake_cuda
    return fake_cuda


class _Ctx:
    """What ``_WindowNorm.backward`` reads of its autograd context."""

    def __init__(self, saved, needs, source, terms=None, prod_shapes=(None,
                                                                      None)):
        self.saved_tensors = saved
        self.needs_input_grad = needs
        self.source = source
        self.terms = terms
        self.prod_shapes = prod_shapes
        #: no upstream-compensated feeding norm (compensate='upstream')
        self.up_slices = ()


def _identity_world(monkeypatch):
    """A world of one: the all-reduce changes nothing."""
    calls = []
    monkeypatch.setattr(dist, 'all_reduce',
                        lambda t, op=None, group=None: calls.append(t.clone()))
    return calls


def _backward_case(channels=4, dtype=torch.float64, k=3):
    from mmcbn.window import WindowGradTerms
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, channels, 5, generator=g, dtype=dtype) * 2 + 1
    gy = torch.randn(3, channels, 5, generator=g, dtype=dtype)
    w = torch.rand(channels, generator=g, dtype=dtype) + 0.5
    mean = x.mean((0, 2)) + 0.1
    invstd = torch.rand(channels, generator=g, dtype=dtype) + 0.5
    n_eff = torch.tensor(15. * k, dtype=dtype)
    terms = WindowGradTerms(
        torch.randn(1, 6, generator=g, dtype=dtype),
        torch.randn(channels, 6, generator=g, dtype=dtype),
        torch.tensor(0.4, dtype=dtype).expand(channels),
        torch.randn(channels, generator=g, dtype=dtype))
    return x, gy, w, mean, invstd, n_eff, terms


def _reference_backward(x, gy, w, mean, invstd, n_eff, terms):
    """BatchNorm's gradients with n_eff samples and the window rule's
    closed form (one group), written out."""
    xmu = x - mean[None, :, None]
    s_g = gy.sum((0, 2))
    s_gx = (gy * xmu).sum((0, 2))
    gamma = w * invstd
    gx = gamma[None, :, None] * (
        gy - s_g[None, :, None] / n_eff -
        xmu * (invstd**2 * s_gx)[None, :, None] / n_eff)
    g_mean = -gamma * s_g
    g_var = -0.5 * gamma * invstd**2 * s_gx
    gpw = terms.V * g_var[:, None] + g_mean[:, None] * terms.U[0][None]
    gpb = g_mean * terms.bu + g_var * terms.bv
    return gx, s_gx * invstd, s_g, gpw, gpb


@pytest.mark.parametrize('path', ['local_cpu', 'combined_cpu'])
def test_window_norm_backward_of_each_path(monkeypatch, path):
    """Both CPU backward paths (local; combined over processes, here a
    world of one) give BatchNorm's gradients with K n samples and the
    window rule's producer gradients. (The CUDA path needs the fake-CUDA
    shim loaded before torch: ``test_cuda_audit.py``.)"""
    from mmcbn.functional import LOCAL, _WindowNorm
    x, gy, w, mean, invstd, n_eff, terms = _backward_case()
    ref = _reference_backward(x, gy, w, mean, invstd, n_eff, terms)
    source = LOCAL
    calls = []
    if path == 'combined_cpu':
        calls = _identity_world(monkeypatch)
        source = AllReduceStats()
    args = (x, w, mean, invstd, n_eff, gy)
    unwrap = lambda t: t  # noqa: E731
    *saved, grad_y = args
    needs = (True, True, True) + (False, ) * 5 + (True, True, False)
    ctx = _Ctx(tuple(saved), needs, source, terms,
               ((torch.Size([4, 6, 1, 1]), torch.float32), torch.float32))
    out = _WindowNorm.backward(ctx, grad_y)
    # x, weight, bias, 5 non-tensors, producer weight and bias, terms and
    # the upstream slices (no upstream parameter)
    assert len(out) == 12 and all(o is None for o in out[3:8] + out[10:])
    gx, gw, gb, gpw, gpb = (unwrap(o) for o in out[:3] + out[8:10])
    torch.testing.assert_close(gx, ref[0])
    torch.testing.assert_close(gw, ref[1])
    torch.testing.assert_close(gb, ref[2])
    assert gpw.shape == (4, 6, 1, 1) and gpw.dtype == torch.float32
    assert gpb.dtype == torch.float32
    torch.testing.assert_close(gpw.double().view(4, 6), ref[3])
    torch.testing.assert_close(gpb.double(), ref[4])
    if path == 'combined_cpu':
        assert len(calls) == 1  # the sums, summed over the processes once
        xmu = x - mean[None, :, None]
        torch.testing.assert_close(
            calls[0], torch.cat([gy.sum((0, 2)), (gy * xmu).sum((0, 2))]))

    # no input gradient wanted: the producer's still flows; nothing else
    needs = (False, False, True) + (False, ) * 5 + (False, True, False)
    ctx = _Ctx(tuple(saved), needs, source, terms,
               ((torch.Size([4, 6, 1, 1]), torch.float32), torch.float32))
    out = _WindowNorm.backward(ctx, grad_y)
    assert out[0] is None and out[1] is None and out[8] is None
    torch.testing.assert_close(unwrap(out[2]), ref[2])
    torch.testing.assert_close(unwrap(out[9]).double(), ref[4])


def test_window_norm_backward_of_an_empty_batch(monkeypatch):
    """A process with no samples still takes part in the collective (with
    zeros) and returns zero gradients."""
    from mmcbn.functional import _WindowNorm
    calls = _identity_world(monkeypatch)
    x = torch.zeros(0, 3, 4)
    w = torch.ones(3)
    saved = (x, w, torch.zeros(3), torch.ones(3), torch.tensor(0.))
    needs = (True, True, True) + (False, ) * 8
    out = _WindowNorm.backward(_Ctx(saved, needs, AllReduceStats()), x)
    assert len(calls) == 1 and calls[0].shape == (6, ) and not calls[0].any()
    assert out[0].shape == x.shape
    assert torch.equal(out[1], torch.zeros(3)) and torch.equal(
        out[2], torch.zeros(3))
    assert all(o is None for o in out[3:])
    needs = (False, False, False) + (False, ) * 8
    out = _WindowNorm.backward(_Ctx(saved, needs, AllReduceStats()), x)
    assert all(o is None for o in out)
    assert len(calls) == 1


def test_input_grad_cuda_branch_matches_cpu():
    """``_input_grad`` on fake CUDA (``batch_norm_backward_elemt`` with
    int32 counts, emulated) equals the CPU branch and the formula."""
    from mmcbn.functional import _input_grad
    fc = _fake_cuda()
    x, gy, w, mean, invstd, n_eff, _ = _backward_case(dtype=torch.float32)
    s_g = torch.randn(4, dtype=torch.float32)
    s_gx = torch.randn(4, dtype=torch.float32)
    count = torch.tensor(40.2)  # rounded to 40 samples on CUDA
    args = (gy, x, w, mean, invstd, s_g, s_gx)
    cpu = _input_grad(*args, torch.tensor(40.))
    xmu = x - mean[None, :, None]
    ref = (w * invstd)[None, :, None] * (
        gy - s_g[None, :, None] / 40 -
        xmu * (invstd**2 * s_gx)[None, :, None] / 40)
    torch.testing.assert_close(cpu, ref)
    cuda = _input_grad(*(fc.to_fake(t) for t in args), fc.to_fake(count))
    assert isinstance(cuda, fc.FakeCudaTensor)
    torch.testing.assert_close(fc.unwrap(cuda), ref)
    # no affine weight
    torch.testing.assert_close(
        fc.unwrap(_input_grad(*(fc.to_fake(t) if t is not None else None
                                for t in (gy, x, None, mean, invstd, s_g,
                                          s_gx)), fc.to_fake(count))),
        _input_grad(gy, x, None, mean, invstd, s_g, s_gx,
                    torch.tensor(40.)))


def test_batch_stats_cuda_and_cpu_agree():
    from mmcbn.functional import batch_stats
    fc = _fake_cuda()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 6, generator=g) * 3 + 2
    x[:, 1] = 5.  # a constant channel: variance 0, not inf
    ref_mean = x.double().mean((0, 2))
    ref_var = x.double().var((0, 2), unbiased=False)
    for xs, tol in ((x, 1e-6), (x.half(), 3e-3)):
        for device_x, unwrap in ((xs, lambda t: t),
                                 (fc.to_fake(xs), fc.unwrap)):
            mean, var = (unwrap(t) for t in batch_stats(device_x))
            assert mean.dtype == var.dtype == torch.float32
            torch.testing.assert_close(mean.double(), ref_mean, rtol=tol,
                                       atol=tol)
            torch.testing.assert_close(var.double(), ref_var, rtol=tol,
                                       atol=tol)
            # not inf (CUDA's invstd 0), and the eps passed is taken back
            # out, up to the float32 rounding of invstd
            assert 0 <= var[1] <= 1e-30 * 2**-20
    mean, var = batch_stats(x.double())
    assert mean.dtype == var.dtype == torch.float64
    empty = batch_stats(torch.zeros(0, 3, 2, dtype=torch.half))
    for t in empty:
        assert t.dtype == torch.float32 and t.shape == (3, ) and not t.any()
    assert empty[0] is not empty[1]


def test_window_norm_of_an_empty_history_is_batchnorm(monkeypatch):
    """SyncCBN's first iteration: an empty history (``empty_history``)
    and a world of one: BatchNorm, output and gradients."""
    from mmcbn.functional import window_norm
    from mmcbn.window import empty_history
    g = torch.Generator().manual_seed(2)
    mean_like = torch.zeros(3, dtype=torch.float64)
    hist = empty_history(2, mean_like)
    assert hist.count.shape == (2, ) and not hist.count.any()
    for t in hist[1:5]:
        assert t.shape == (2, 3) and t.dtype == torch.float64
    assert hist.dropped.shape == () and hist.dropped.dtype == torch.int64
    assert hist.match is None and hist.slots is None
    _identity_world(monkeypatch)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64,
                    requires_grad=True)
    w = torch.rand(3, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    cur_mean = x.detach().mean((0, 2))
    cur_var = x.detach().var((0, 2), unbiased=False)
    y, stats = window_norm(x, w, b, cur_mean, cur_var, *hist[:3], 1e-5,
                           AllReduceStats())
    ref = torch.nn.functional.batch_norm(x, None, None, w, b, True, 0., 1e-5)
    torch.testing.assert_close(y, ref)
    assert stats.k == 1 and stats.keep.tolist() == [True, False, False]
    coef = torch.randn(y.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((y * coef).sum(), (x, w, b))
    refs = torch.autograd.grad((ref * coef).sum(), (x, w, b))
    for a, r in zip(grads, refs):
        torch.testing.assert_close(a, r)


# ------------------------------------------------------------------- window
@pytest.mark.parametrize('chunk', [1 << 20, 7])
@pytest.mark.parametrize('groups', [1, 2])
def test_window_products_match_einsum(monkeypatch, chunk, groups):
    """The chunked row products and the grouped dot products, in one piece
    and in chunks of output channels, against einsum."""
    from mmcbn import compensation as W
    monkeypatch.setattr(W, '_CHUNK_ELEMENTS', chunk)
    g = torch.Generator().manual_seed(4)
    s, c, length = 3, 6, 5
    weight = torch.randn(c, length, 1, generator=g, dtype=torch.float64)
    grad = torch.randn(s, c, length, generator=g, dtype=torch.float64)
    coef = torch.randn(s, c, generator=g, dtype=torch.float64)
    pbar = torch.randn(s, groups, length, generator=g, dtype=torch.float64)
    w2 = weight.view(c, length)
    torch.testing.assert_close(W._row_dot(grad, weight),
                               torch.einsum('scl,cl->sc', grad, w2))
    torch.testing.assert_close(W._weighted_rows(grad, coef),
                               torch.einsum('sc,scl->cl', coef, grad))
    pfull = pbar.repeat_interleave(c // groups, dim=1)  # (S, C, L)
    torch.testing.assert_close(W._group_dot(pbar, weight),
                               torch.einsum('scl,cl->sc', pfull, w2))
    torch.testing.assert_close(W._group_dot_t(coef, pbar),
                               torch.einsum('sc,scl->cl', coef, pfull))


def test_record_phase_is_a_deterministic_spread_offset():
    from mmcbn.window import record_phase
    for stride in (2, 3, 4):
        phases = [record_phase(it, 0, 0, stride) for it in range(400)]
        assert phases == [record_phase(it, 0, 0, stride)
                          for it in range(400)]
        counts = [phases.count(p) for p in range(stride)]
        assert min(counts) > 400 / stride / 2, counts  # all, spread
        # the call position and the dimension draw differently
        assert [record_phase(it, 1, 0, stride) for it in range(400)] \
            != phases
        assert [record_phase(it, 0, 1, stride) for it in range(400)] \
            != phases
    assert {record_phase(it, 3, 1, 1) for it in range(50)} == {0}


def _key(weight_id=11, bias_id=12, shape=(3, 2, 1, 1)):
    return ('conv', weight_id, shape, bias_id, (1, 1), True)


def _record(c=3, value=1.):
    from mmcbn.window import Record
    mean = torch.full((c, ), value)
    return Record(raw_mean=mean, raw_var=mean + 1, a_mean=mean,
                  a_var=mean + 1)


def test_window_state_ring_and_keys():
    from mmcbn.window import WindowState, entry_shapes
    ws = WindowState(2)
    assert len(ws) == 0 and ws.nbytes() == 0
    assert not ws.adopt_key(_key())  # nothing to adopt
    assert bool(ws.push(0, _key(), _record(value=0.), 4))
    assert bool(ws.push(1, _key(), _record(value=1.), 4))
    assert len(ws) == 2
    assert ws.nbytes() == sum(b.numel() * b.element_size()
                              for b in ws._buffers.values()) > 0
    # the oldest entry is overwritten; the same iteration again is in place
    ws.push(2, _key(), _record(value=2.), 5)
    assert ws.iterations == [2, 1]
    ws.push(2, _key(), _record(value=3.), 6)
    assert ws.iterations == [2, 1]
    assert ws._buffers['count'].tolist() == [6., 4.]
    assert ws._buffers['a_mean'][0].tolist() == [3.] * 3
    # a non-finite record is stored as zeros and marked unusable
    assert not bool(ws.push(3, _key(), _record(value=float('nan')), 4))
    assert ws._buffers['count'].tolist() == [6., 0.]
    assert not ws._buffers['a_mean'][1].any()
    assert entry_shapes(ws.state_dict())['a_mean'] == (3, )

    # which lags hold an entry of this producer (the host's bookkeeping:
    # iterations 2 and 3, finite or not)
    assert ws.iterations == [2, 3]
    assert ws.has_entries(4, 1, _key())
    assert ws.has_entries(3, 1, _key())
    assert not ws.has_entries(5, 1, _key())
    assert ws.has_entries(5, 2, _key())
    assert not ws.has_entries(6, 2, _key())
    assert not ws.has_entries(4, 0, _key())
    assert not ws.has_entries(4, 2, _key(weight_id=99))
    assert not ws.has_entries(2, 2, _key())  # nothing before iteration 2
    assert not ws.has_entries(3, 2, ('bn', ))

    # a copied model's producer (other parameter ids) takes the entries over
    assert ws.adopt_key(_key(weight_id=21, bias_id=22))
    assert ws.key == _key(weight_id=21, bias_id=22)
    assert not ws.adopt_key(_key(weight_id=21, bias_id=None))  # no bias now
    assert not ws.adopt_key(_key(21, 22, shape=(3, 2, 3, 3)))
    assert not ws.adopt_key(('linear', ) + _key(21, 22)[1:])
    assert not ws.adopt_key(_key(21, 22) + (1, ))
    assert ws.key == _key(weight_id=21, bias_id=22)
    ws.key = ('bn', )
    assert not ws.adopt_key(('bn', 1))
    # another producer starts the window afresh
    ws.key = _key()
    ws.push(7, _key(weight_id=5), _record(), 4)
    assert ws.iterations == [7, None] and len(ws) == 1
    assert ws.key == _key(weight_id=5)


def test_window_state_load_checks_the_capacity():
    from mmcbn.window import WindowState
    ws = WindowState(2)
    ws.push(0, _key(), _record(), 4)
    state = ws.state_dict()
    assert state['capacity'] == 2 and state['next'] == 1
    with pytest.raises(ValueError, match='a window of 2 earlier entries '
                       'cannot fill one of 3'):
        WindowState(3).load_state_dict(state, torch.device('cpu'))
    other = WindowState(2)
    other.load_state_dict(state, torch.device('cpu'))
    assert other.iterations == [0, None] and other._next == 1
    assert other.key == _key()
    other.push(1, _key(), _record(), 4)  # continues the ring
    assert other.iterations == [0, 1]


def test_hook_value_errors_say_what_is_accepted():
    from mmcbn import CBNHook
    with pytest.raises(ValueError) as err:
        CBNHook(text_log='some')
    assert str(err.value) == ("CBNHook text_log must be one of 'summary', "
                              "'full', 'none', got 'some'")
    with pytest.raises(ValueError) as err:
        CBNHook(window_unit='epoch')
    assert str(err.value) == ("CBNHook window_unit must be 'iteration' or "
                              "'cycle', got 'epoch'")
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError) as err:
            CBNHook(interval=bad)
        assert str(err.value) == ('CBNHook interval must be None or an '
                                  f'integer >= 1, got {bad!r}')


def test_resume_without_window_state_says_why(caplog):
    """A resume from a checkpoint without window state (or with
    ``resume_window=False``) logs why the windows start empty and touches
    nothing; ``load_from`` (no resume) says nothing."""
    import logging

    from mmcbn import CBNHook
    from mmcbn.hooks.cbn_hook import CKPT_KEY
    net = _trained_net()
    before = list(net[1]._windows[0].iterations)
    cases = [(CBNHook(), {}, True,
              'CBNHook: the checkpoint holds no CBN window state; the '
              'windows refill within window - 1 iterations.'),
             (CBNHook(resume_window=False), {CKPT_KEY: {}}, True,
              'CBNHook: resume_window=False: the CBN windows start empty '
              'and refill.'),
             (CBNHook(), {CKPT_KEY: {}}, False, None)]
    for hook, checkpoint, resume, message in cases:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger='mutation_kills'):
            hook.after_load_checkpoint(_Runner(net, _resume=resume),
                                       checkpoint)
        assert [r.getMessage() for r in caplog.records] == (
            [message] if message else [])
        assert net[1]._windows[0].iterations == before


def test_window_state_restarts_on_a_new_layout():
    """Entries of another shape or dtype under the same key (a new layout)
    do not apply: the ring starts afresh with the new record."""
    from mmcbn.window import WindowState
    for other in (_record(c=4), _record(c=3).__class__(
            **{k: v.double() for k, v in vars(_record(c=3)).items()
               if v is not None})):
        ws = WindowState(3)
        ws.push(0, _key(), _record(c=3), 4)
        ws.push(1, _key(), _record(c=3), 4)
        ws.push(2, _key(), other, 5)
        assert ws.iterations == [2, None, None]
        assert ws._buffers['a_mean'].shape[1:] == other.a_mean.shape
        assert ws._buffers['a_mean'].dtype == other.a_mean.dtype
        assert ws._buffers['count'].tolist() == [5., 0., 0.]


def test_window_files_on_a_remote_backend(monkeypatch):
    """A path with ``://`` goes through mmengine's fileio (here a dict)."""
    from mmcbn.hooks import cbn_hook
    store = {}
    monkeypatch.setattr(cbn_hook, 'fileio_put',
                        lambda data, path: store.__setitem__(path, data))
    monkeypatch.setattr(cbn_hook, 'fileio_get', lambda path: store[path])
    payload = dict(rank=1, windows=dict(t=torch.arange(3.)))
    n = cbn_hook._write_window_file('s3://bucket/a.pt', payload)
    assert list(store) == ['s3://bucket/a.pt'] and n == len(store[
        's3://bucket/a.pt'])
    back = cbn_hook._read_window_file('s3://bucket/a.pt')
    assert back['rank'] == 1 and torch.equal(back['windows']['t'],
                                             torch.arange(3.))


def test_hook_on_a_bare_runner(caplog):
    """A runner without hooks or a log processor (a test harness): nothing
    to find or to filter; a compiled model is warned about."""
    import logging

    from mmcbn import CBNHook

    class Bare:
        pass

    hook = CBNHook()
    assert hook._find_hook(Bare(), 'LoggerHook') is None
    hook._filter_text_log(Bare())
    assert hook._log_processor is None

    class Loader(list):
        pass

    runner = _Runner(_trained_net(steps=0), _compile=True,
                     train_dataloader=Loader([0] * 4), work_dir='/w')
    with caplog.at_level(logging.INFO, logger='mutation_kills'):
        CBNHook(atomic_checkpoints=False).before_train(runner)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(
        'CBNHook: the model is compiled (compile=True).')
    assert 'every CBN layer runs as BatchNorm (window 1)' in warnings[0]


def test_empty_batch_sends_zero_window_gradient(monkeypatch):
    """SyncCBN with the window rule on a process with no samples: the
    collective still runs, and the producer's gradient is zero."""
    from mmcbn.functional import _WindowNorm
    from mmcbn.window import WindowGradTerms
    calls = _identity_world(monkeypatch)
    x = torch.zeros(0, 4, 3, dtype=torch.float64)
    terms = WindowGradTerms(torch.ones(1, 6, dtype=torch.float64),
                            torch.ones(4, 6, dtype=torch.float64),
                            torch.ones(4, dtype=torch.float64),
                            torch.ones(4, dtype=torch.float64))
    saved = (x, torch.ones(4, dtype=torch.float64),
             torch.zeros(4, dtype=torch.float64),
             torch.ones(4, dtype=torch.float64),
             torch.tensor(0., dtype=torch.float64))
    needs = (True, True, True) + (False, ) * 5 + (True, True, False)
    out = _WindowNorm.backward(
        _Ctx(saved, needs, AllReduceStats(), terms,
             ((torch.Size([4, 6]), torch.float32), torch.float32)), x)
    assert len(calls) == 1
    assert out[8].shape == (4, 6) and out[8].dtype == torch.float32
    assert out[9].shape == (4, ) and out[9].dtype == torch.float32
    assert not out[8].any() and not out[9].any()


def test_normalize_a_half_model_on_cpu():
    """A bf16/fp16 model on CPU: half input and affine parameters, float32
    statistics; the output is the float computation, rounded."""
    from mmcbn.functional import normalize
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.bfloat16, torch.float16):
        x = (torch.randn(2, 3, 4, generator=g) * 2 + 1).to(dtype)
        w = (torch.rand(3, generator=g) + 0.5).to(dtype)
        b = torch.randn(3, generator=g).to(dtype)
        mean = x.float().mean((0, 2))
        var = x.float().var((0, 2), unbiased=False)
        ref = (x.float() - mean[None, :, None]) / torch.sqrt(
            var + 1e-5)[None, :, None] * w.float()[None, :, None] + \
            b.float()[None, :, None]
        for wb in ((w, b), (w, None)):
            y = normalize(x, *wb, mean, var, 1e-5)
            assert y.dtype == dtype
            expected = ref if wb[1] is not None else ref - b.float()[
                None, :, None]
            torch.testing.assert_close(y, expected.to(dtype))


def test_window_moments_in_float64():
    """A float64 model's window average stays float64 (weights 1/K
    included): the mean of three entries to float64 precision."""
    from mmcbn.functional import window_moments
    count = torch.tensor([5., 0., 3., 2.], dtype=torch.float64)
    mean = torch.tensor([[1.], [7.], [0.1], [0.2]], dtype=torch.float64)
    var = torch.tensor([[0.5], [9.], [-0.25], [0.3]], dtype=torch.float64)
    mean_bar, var_bar, k, keep = window_moments(count, mean, var)
    assert keep.tolist() == [True, False, True, True] and k == 3
    assert k.dtype == mean_bar.dtype == var_bar.dtype == torch.float64
    expected = (1. + 0.1 + 0.2) / 3
    assert abs(mean_bar.item() - expected) < 1e-15
    spread = [0.5 + (1 - expected)**2, 0. + (0.1 - expected)**2,
              0.3 + (0.2 - expected)**2]  # the negative variance repaired
    assert abs(var_bar.item() - sum(spread) / 3) < 1e-15
