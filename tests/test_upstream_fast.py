# Copyright (c) mmcbn contributors. All rights reserved.
"""The fast upstream compensation (``upstream_form='fast'``,
:mod:`mmcbn.upstream_fast`) against the independent float64 reference of
``reference_upstream.py`` (a jvp through the feeding norms) where the fast
form is exact, and against the exact form where it must agree."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmcbn.window as window_module
from mmcbn import CBN1d, CBN2d
from reference_cbn import ReferenceCBN
from reference_upstream import ReferenceUpstreamCBN, compare_trajectories


def _affine(aff, xhat):
    shape = (1, -1) + (1, ) * (xhat.dim() - 2)
    return aff[0].view(shape) * xhat + aff[1].view(shape)


class Chain(nn.Module):
    """prod0 -> n0 -> relu -> prod1 -> n1 (n1 fed by n0 through a gate)."""

    def __init__(self, prod0, n0, prod1, n1):
        super().__init__()
        self.prod0, self.n0, self.prod1, self.n1 = prod0, n0, prod1, n1

    def forward(self, x):
        return self.n1(self.prod1(F.relu(self.n0(self.prod0(x)))))


def _exact_pair(linear, window, burnin, window_grad, form, seed=0,
                groups=1):
    """Our chain and the reference chain where the fast form is exact: a
    single feeding channel into a 1x1 producer (the diagonal is the whole
    covariance) whose weight does not move (``W_t = W_tau``: learning
    rate 0, so its gradient is still compared)."""
    torch.manual_seed(seed)
    if linear:
        prods = (nn.Linear(3, 1), nn.Linear(1, 4))
        norm = CBN1d
    else:
        # (one input channel per output channel: groups 1 of 1 channel, or
        # a depthwise 1x1 convolution)
        prods = (nn.Conv2d(3, groups, 3, padding=1),
                 nn.Conv2d(groups, 4, 1, groups=groups))
        norm = CBN2d
    kwargs = dict(window=window, burnin=burnin, compensate='upstream',
                  running_stats_from='batch', window_grad=window_grad,
                  upstream_form=form)
    width = prods[0].out_features if linear else groups
    ours = Chain(copy.deepcopy(prods[0]), norm(width, **kwargs),
                 copy.deepcopy(prods[1]), norm(4, **kwargs)).double()
    r_prods = copy.deepcopy(prods)
    r0 = ReferenceCBN(r_prods[0], width, window, burnin,
                      window_grad=window_grad)
    r1 = ReferenceUpstreamCBN(
        r_prods[1], 4, window, [r0],
        lambda affs, xh: F.relu(_affine(affs[0], xh[0])), burnin,
        window_grad=window_grad)

    class Ref(nn.Module):

        def __init__(self):
            super().__init__()
            self.r0, self.r1 = r0, r1

        def forward(self, x):
            return self.r1(F.relu(self.r0(x)))

    return ours, Ref().double()


def _pairs(ours, ref):
    out = []
    for mine, theirs, prod in ((ours.n0, ref.r0, ours.prod0),
                               (ours.n1, ref.r1, ours.prod1)):
        out += [(mine.weight, theirs.weight), (mine.bias, theirs.bias)]
        for name, p in prod.named_parameters():
            if p.requires_grad:
                out.append((p, getattr(theirs.producer, name)))
    return out


def _sgd(chain_params, still, lr):
    """SGD with momentum; ``still`` (a parameter) at learning rate 0."""
    moving = [p for p in chain_params if p is not still]
    return torch.optim.SGD([dict(params=moving),
                            dict(params=[still], lr=0.0)], lr=lr,
                           momentum=0.9)


def _loss(y, target):
    return ((y - target)**2).mean() + y.sin().mean()


def _train(ours, ref, shape, steps=12, lr=0.2):
    def still(model):  # (the producer weight of n1)
        return model.prod1.weight if hasattr(model, 'prod1') else \
            model.r1.producer.weight

    compare_trajectories(
        ours, ref, shape,
        lambda a, b: [(str(i), p, q) for i, (p, q) in enumerate(
            _pairs(a, b))], steps,
        lambda m: _sgd(m.parameters(), still(m), lr), _loss)


@pytest.mark.parametrize('linear,groups', [(True, 1), (False, 1),
                                           (False, 2)])
@pytest.mark.parametrize('window_grad', [True, False])
def test_fast_matches_reference_where_it_is_exact(linear, groups,
                                                  window_grad):
    ours, ref = _exact_pair(linear, 3, 1, window_grad, 'fast', groups=groups)
    _train(ours, ref, (6, 3) if linear else (2, 3, 4, 4))
    assert 'CBN' in ours.n1.bindings[0].upstream
    state = ours.n1._windows[0]._buffers
    assert {'up_pu', 'up_dv', 'up_rho'} <= set(state)
    assert not {'up_hm', 'up_hc'} & set(state)


class _Capture:
    """The histories ``WindowState.compensated`` returns, per window."""

    def __init__(self, monkeypatch):
        self.seen = {}
        original = window_module.WindowState.compensated

        def compensated(state, *args, **kwargs):
            history = original(state, *args, **kwargs)
            self.seen.setdefault(id(state), []).append(history)
            return history

        monkeypatch.setattr(window_module.WindowState, 'compensated',
                            compensated)

    def last(self, layer):
        return self.seen[id(layer._windows[0])][-1]


def _residual(form, seed=0):
    """conv0 -> n0 -> relu = h; conv1(h) -> n1; relu(n1 + h) -> conv2 ->
    n2 (3x3 convolutions with padding: borders and neighbouring pixels)."""
    torch.manual_seed(seed)

    class Net(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
            self.n0, self.n1, self.n2 = (
                CBN2d(c, window=2, compensate='upstream',
                      upstream_form=form) for c in (4, 4, 5))

        def forward(self, x):
            h = F.relu(self.n0(self.conv0(x)))
            z = F.relu(self.n1(self.conv1(h)) + h)
            return self.n2(self.conv2(z))

    return Net().double()


def _two_steps(monkeypatch, form, edit, same_input=False):
    """Record at step 0, ``edit`` the model, compensate at step 1; the
    histories of n1 and n2 at step 1."""
    capture = _Capture(monkeypatch)
    net = _residual(form)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 3, 6, 6, generator=gen, dtype=torch.float64)
    x1 = x0 if same_input else torch.randn(3, 3, 6, 6, generator=gen,
                                           dtype=torch.float64)
    net(x0)
    with torch.no_grad():
        edit(net)
    net(x1)
    return capture.last(net.n1), capture.last(net.n2)


def _affine_edit(net, scale=None):
    gen = torch.Generator().manual_seed(3)
    for norm in (net.n0, net.n1):
        if scale is None:
            norm.weight.mul_(1 + 0.2 * torch.randn(
                norm.weight.shape, generator=gen, dtype=torch.float64))
            norm.bias.add_(0.2 * torch.randn(
                norm.bias.shape, generator=gen, dtype=torch.float64))
        else:
            norm.weight.mul_(scale)
            norm.bias.mul_(scale)


def test_fast_mean_is_the_exact_forms_where_the_weight_did_not_move(
        monkeypatch):
    """With the producer weights unchanged, the fast mean term (vectors,
    contracted with W_t) equals the exact form's (matrices contracted with
    W_tau), borders of the 3x3 convolutions included; so does the one
    of a layer fed by two norms, whose kappa differs between the forms
    only through its feeding norm's variance."""
    exact = _two_steps(monkeypatch, 'exact', _affine_edit)
    fast = _two_steps(monkeypatch, 'fast', _affine_edit)
    moved = (exact[0].mean - exact[0].raw_mean).abs().max()
    assert moved > 1e-2  # the edit moved the statistics
    torch.testing.assert_close(fast[0].mean, exact[0].mean, rtol=0,
                               atol=1e-12)
    # the variance term is an approximation: close, not equal
    assert (fast[0].var - exact[0].var).abs().max() > 1e-6


def test_fast_variance_is_exact_when_the_feeding_norms_scale(monkeypatch):
    """n0 scales its output by 1.1 (gamma and beta; the same input, so
    its kappa = 1 and delta = 0): for n1, fed by n0 alone, the calibrated
    diagonal gives the exact first-order change of the variance (2 alpha
    var, 3x3 convolution, padding and neighbouring pixels included). n2 is
    fed by n1 too, whose displacement is not a pure scale (its own kappa
    follows its compensated window): there the diagonal is close."""
    edit = lambda net: _affine_edit(net, 1.1)  # noqa: E731
    exact = _two_steps(monkeypatch, 'exact', edit, same_input=True)
    fast = _two_steps(monkeypatch, 'fast', edit, same_input=True)
    for e, f in zip(exact, fast):
        assert (e.var - e.raw_var).abs().max() > 1e-3
        torch.testing.assert_close(f.mean, e.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast[0].var, exact[0].var, rtol=0,
                               atol=1e-12)
    moved = (exact[1].var - exact[1].raw_var).abs()
    error = (fast[1].var - exact[1].var).abs()
    assert error.max() > 1e-9 and (error / moved).max() < 0.05


def test_mean_form_keeps_the_mean_term_only(monkeypatch):
    """``upstream_form='mean'``: the fast mean term and no variance term
    (the variance moves by the squared mean shift alone)."""
    fast = _two_steps(monkeypatch, 'fast', _affine_edit)
    mean = _two_steps(monkeypatch, 'mean', _affine_edit)
    torch.testing.assert_close(mean[0].mean, fast[0].mean, rtol=0,
                               atol=1e-12)
    shift = mean[0].mean - mean[0].raw_mean
    torch.testing.assert_close(mean[0].var, mean[0].raw_var - shift**2,
                               rtol=0, atol=1e-12)


def test_fast_window_holds_vectors():
    """The fast form keeps C_in-sized vectors per feeding block where the
    exact form keeps (C_out, 2, C_f) matrices twice."""
    sizes = {}
    for form in ('exact', 'fast'):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), CBN2d(32, window=4),
            nn.ReLU(), nn.Conv2d(32, 64, 1),
            CBN2d(64, window=4, compensate='upstream', upstream_form=form))
        for _ in range(4):
            model(torch.randn(2, 3, 6, 6)).sum().backward()
        buffers = model[4]._windows[0]._buffers
        sizes[form] = {k: v.numel() // v.shape[0] for k, v in buffers.items()
                       if k.startswith('up_')}
    assert sizes['exact']['up_hm'] == sizes['exact']['up_hc'] == 64 * 2 * 32
    assert sizes['fast'] == dict(up_pu=2 * 32, up_dv=2 * 32, up_rho=64,
                                 up_state=6 * 32)


@pytest.mark.parametrize('value', ['Fast', None, 1, 'diag'])
def test_upstream_form_is_checked(value):
    with pytest.raises(ValueError, match=f'upstream_form.*{value!r}'):
        CBN2d(4, compensate='upstream', upstream_form=value)


@pytest.mark.parametrize('value', [0, 1.5, True])
def test_upstream_feeding_is_checked(value):
    with pytest.raises(ValueError, match=f'upstream_feeding.*{value!r}'):
        CBN2d(4, compensate='upstream', upstream_feeding=value)


# ------------------------------------------------ SyncCBN on two processes
def _sync_chain(sync):
    """The exact-diagonal chain of ``_exact_pair`` (2d), SyncCBN or CBN."""
    from mmcbn import SyncCBN2d
    torch.manual_seed(0)
    norm = SyncCBN2d if sync else CBN2d
    kwargs = dict(window=3, burnin=1, compensate='upstream',
                  upstream_form='fast')
    return Chain(nn.Conv2d(3, 1, 3, padding=1), norm(1, **kwargs),
                 nn.Conv2d(1, 4, 1), norm(4, **kwargs)).double()


def _sync_train(model, part=None, world=1):
    """Eight SGD steps on global batches of 4 (``part``: this process's
    slice; the loss is a sum, averaged over ``world``)."""
    inner = getattr(model, 'module', model)
    opt = _sgd(model.parameters(), inner.prod1.weight, 0.1)
    gen = torch.Generator().manual_seed(2)
    outputs = []
    for step in range(8):
        x = torch.randn(4, 3, 4, 4, generator=gen, dtype=torch.float64)
        coef = torch.randn(4, 4, 4, 4, generator=gen, dtype=torch.float64)
        if part is not None:
            x, coef = x[part], coef[part]
        y = model(x)
        opt.zero_grad()
        ((y * coef).sum() / world + y.sin().sum() / world).backward()
        opt.step()
        outputs.append(y.detach())
    return outputs


def _sync_worker(rank, world, out_dir):
    import os.path as osp

    from torch.nn.parallel import DistributedDataParallel as DDP
    model = _sync_chain(sync=True)
    outputs = _sync_train(DDP(model, broadcast_buffers=False),
                          slice(0, 1) if rank == 0 else slice(1, None))
    torch.save(dict(outputs=outputs, state=model.state_dict()),
               osp.join(out_dir, f'rank{rank}.pt'))


def test_sync_fast_equals_cbn_on_the_gathered_batch(tmp_path):
    """SyncCBN (batches 1 and 3) equals CBN on the gathered batch of 4
    where the fast form is exact (elsewhere each process makes the
    diagonal approximation about its own batch, and the combination of
    the approximated entries is exact)."""
    from dist_utils import run_and_load
    ranks = run_and_load(_sync_worker, tmp_path)
    reference = _sync_chain(sync=False)
    ref_out = _sync_train(reference, world=2)
    for step, ref in enumerate(ref_out):
        got = torch.cat([r['outputs'][step] for r in ranks])
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-9,
                                   msg=lambda m: f'step {step}: {m}')
    for name, value in reference.state_dict().items():
        for r in ranks:
            torch.testing.assert_close(r['state'][name], value, rtol=1e-8,
                                       atol=1e-9, msg=name)
    assert reference.n1.bindings[0].upstream_followed == 1


# ------------------------------------------- the paths between the norms
#: Between the first-level norm outputs ``ys`` (n_a: 4 channels at half
#: the resolution for the upsamplings, n_c: 3 channels) and the producer
#: of n_b: each a linear step of a frozen forward pass.
BETWEEN = {
    'maxpool': (lambda ys: F.max_pool2d(F.relu(ys[0]), 3, 1, 1), False),
    'avgpool': (lambda ys: F.avg_pool2d(F.relu(ys[0]), 3, 1, 1), False),
    'adaptive': (lambda ys: F.adaptive_avg_pool2d(F.relu(ys[0]), (3, 3)),
                 False),
    'nearest': (lambda ys: F.relu(F.interpolate(ys[0], scale_factor=2.0,
                                                mode='nearest')), True),
    'bilinear': (lambda ys: F.interpolate(
        F.relu(ys[0]), size=(6, 6), mode='bilinear', align_corners=False),
                 True),
    'cat': (lambda ys: F.relu(torch.cat([F.relu(ys[0]), ys[1]], 1)), False),
}


class PathNet(nn.Module):
    """conv_a -> n_a and conv_c -> n_c; ``between``; conv_b -> n_b."""

    def __init__(self, kind, norm, cbn_kw, groups=1):
        super().__init__()
        self.between, half = BETWEEN[kind]
        self.conv_a = nn.Conv2d(3, 4, 3, stride=2 if half else 1, padding=1)
        self.conv_c = nn.Conv2d(3, 3, 3, padding=1)
        out = 5 if groups == 1 else 8
        self.conv_b = nn.Conv2d(7 if kind == 'cat' else 4, out, 3, padding=1,
                                groups=groups)
        self.n_a, self.n_c = norm(4), norm(3)
        self.n_b = CBN2d(out, **cbn_kw)

    def forward(self, x):
        ys = [self.n_a(self.conv_a(x)), self.n_c(self.conv_c(x))]
        return self.n_b(self.conv_b(self.between(ys)))


def _path_pair(kind, form, window=3, burnin=1, groups=1):
    torch.manual_seed(0)
    kw = dict(window=window, burnin=burnin, compensate='upstream',
              running_stats_from='batch', upstream_form=form)
    ours = PathNet(kind, lambda c: CBN2d(c, **kw), kw, groups).double()
    ref_a = ReferenceCBN(copy.deepcopy(ours.conv_a), 4, window, burnin)
    ref_c = ReferenceCBN(copy.deepcopy(ours.conv_c), 3, window, burnin)
    between = ours.between
    feeds = [ref_a, ref_c] if kind == 'cat' else [ref_a]
    ref_b = ReferenceUpstreamCBN(
        copy.deepcopy(ours.conv_b), ours.n_b.num_features, window, feeds,
        lambda affs, xh: between(
            [_affine(a, x) for a, x in zip(affs, xh)] + [None]), burnin)

    class Ref(nn.Module):

        def __init__(self):
            super().__init__()
            self.ref_a, self.ref_c, self.ref_b = ref_a, ref_c, ref_b

        def forward(self, x):
            return self.ref_b(between([self.ref_a(x), self.ref_c(x)]))

    return ours, Ref().double()


def _path_params(ours, ref):
    out = []
    for mine, theirs in ((ours.n_a, ref.ref_a), (ours.n_c, ref.ref_c),
                         (ours.n_b, ref.ref_b)):
        out += [(mine.weight, theirs.weight), (mine.bias, theirs.bias)]
    for mine, theirs in ((ours.conv_a, ref.ref_a.producer),
                         (ours.conv_c, ref.ref_c.producer),
                         (ours.conv_b, ref.ref_b.producer)):
        out += [(mine.weight, theirs.weight), (mine.bias, theirs.bias)]
    return out


@pytest.mark.parametrize('kind', [k for k in BETWEEN if k != 'cat'])
def test_exact_form_follows_the_path_as_the_reference(kind):
    """Max- and average pooling and upsampling between the norms: the
    exact form follows them (n_b's feeding norm is n_a) and its
    trajectory is the float64 reference's (a jvp through the frozen
    steps)."""
    ours, ref = _path_pair(kind, 'exact')
    compare_trajectories(
        ours, ref, (2, 3, 6, 6),
        lambda a, b: [(str(i), p, q) for i, (p, q) in enumerate(
            _path_params(a, b))], 8,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9),
        _loss)
    info = ours.n_b.bindings[0]
    assert (info.upstream_followed, info.upstream_fallbacks) == (1, 0)


@pytest.mark.parametrize('kind,groups', [(k, 1) for k in BETWEEN] + [
    ('maxpool', 2), ('maxpool', 4)])
def test_fast_form_mean_follows_the_path_as_the_reference(
        kind, groups, monkeypatch):
    """Every path kind, the fast form (a concatenation too: each branch's
    norm lands on its channels; grouped and depthwise producers): after the
    feeding norms' affine moved (the producer's weight did not), n_b's
    compensated mean is the float64 reference's (exact: the mean is
    bilinear), and its variance moved."""
    capture = _Capture(monkeypatch)
    ours, ref = _path_pair(kind, 'fast', window=2, burnin=0, groups=groups)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
          for _ in range(2)]
    ours(xs[0])
    ref(xs[0])
    edit = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mine, theirs in ((ours.n_a, ref.ref_a), (ours.n_c, ref.ref_c)):
            scale = 1 + 0.2 * torch.randn(mine.weight.shape, generator=edit,
                                          dtype=torch.float64)
            shift = 0.2 * torch.randn(mine.bias.shape, generator=edit,
                                      dtype=torch.float64)
            for layer in (mine, theirs):
                layer.weight.mul_(scale)
                layer.bias.add_(shift)
    ours(xs[1])
    ref(xs[1])
    history = capture.last(ours.n_b)
    ref_mean, ref_var = ref.ref_b.last['entries'][1]
    moved = (ref_mean - history.raw_mean[0]).abs().max()
    assert moved > 1e-2
    torch.testing.assert_close(history.mean[0], ref_mean, rtol=0,
                               atol=1e-10)
    assert (history.var[0] - history.raw_var[0]).abs().max() > 1e-3
    info = ours.n_b.bindings[0]
    assert info.upstream_followed == (2 if kind == 'cat' else 1)
    assert info.upstream_fallbacks == 0


def test_exact_form_leaves_a_concatenation_to_the_fast_form():
    ours, _ = _path_pair('cat', 'exact')
    for _ in range(2):
        ours(torch.randn(2, 3, 6, 6, dtype=torch.float64)).sum().backward()
    info = ours.n_b.bindings[0]
    assert info.upstream_followed == 0 and info.upstream_fallbacks == 2
    assert "upstream_form='fast' follows it" in info.upstream


class RoINet(nn.Module):
    """Two 'pyramid levels' (n_a, n_c), an RoI extractor as mmdet's
    SingleRoIExtractor builds it (mmcv RoIAlign per level, rows assigned
    by index, a zero product for an empty level), conv_b -> n_b."""

    ROIS = torch.tensor([[0, 0.5, 0.5, 4.5, 5.0], [1, 1.0, 0.0, 5.5, 4.0],
                         [0, 2.0, 1.0, 5.0, 5.5]], dtype=torch.float64)

    def __init__(self, form):
        super().__init__()
        kw = dict(window=2, compensate='upstream', upstream_form=form)
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_c = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 5, 3, padding=1)
        self.n_a, self.n_c, self.n_b = (CBN2d(c, **kw) for c in (4, 4, 5))
        self.empty = CBN2d(4, **kw)

    def forward(self, x):
        from mmcv.ops import RoIAlign
        align = RoIAlign((3, 3), 1.0, 2, aligned=True)
        feats = [self.n_a(self.conv_a(x)), self.n_c(self.conv_c(x))]
        rois = self.ROIS.to(x.dtype)
        out = feats[0].new_zeros((3, 4, 3, 3))
        for level, inds in enumerate((torch.tensor([0, 2]),
                                      torch.tensor([1]))):
            out[inds] = align(feats[level], rois[inds])
        out = out + feats[1].sum() * 0.  # (an 'empty level')
        self.b_input = self.conv_b(out)
        return self.n_b(self.b_input)


@pytest.mark.parametrize('form', ['exact', 'fast'])
def test_roi_extractor_is_followed(form, monkeypatch):
    """The same images twice, only the levels' norms' affine changed: a
    perfect compensation of n_b's entry is the current batch's statistics;
    the first-order mean is exactly that (RoIAlign and the row assignment
    are linear), for both forms."""
    pytest.importorskip('mmcv.ops')
    capture = _Capture(monkeypatch)
    torch.manual_seed(0)
    net = RoINet(form).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    net(x)
    with torch.no_grad():
        for norm in (net.n_a, net.n_c):
            norm.weight.mul_(torch.linspace(0.8, 1.3, 4,
                                            dtype=torch.float64))
            norm.bias.add_(torch.linspace(-0.2, 0.3, 4,
                                          dtype=torch.float64))
    net(x)
    history = capture.last(net.n_b)
    now = net.b_input.detach().mean((0, 2, 3))
    assert (now - history.raw_mean[0]).abs().max() > 1e-2
    torch.testing.assert_close(history.mean[0], now, rtol=0, atol=1e-10)
    info = net.n_b.bindings[0]
    assert (info.upstream_followed, info.upstream_fallbacks) == (2, 0)
