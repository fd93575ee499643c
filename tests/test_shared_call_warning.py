# Copyright (c) mmcbn contributors. All rights reserved.
"""The silent trap: a head shared over FPN levels with neither CBNHook nor
``set_cbn_iteration``.

Without an iteration given, every training call counts as an iteration, so
the levels of one iteration share one window (level 3 is normalized with
the statistics of levels 1 and 2). A CBN layer notices two calls with its
producer's weights and gradient unchanged and warns once, naming itself and
the fix. Plain training and gradient accumulation (a backward between the
calls) must not warn, and neither must a loop that gives the iteration.
"""
import pytest
import torch
from mmcv.cnn import ConvModule
from torch import nn

from mmcbn import set_cbn_iteration

CFG = dict(type='CBN', window=3)


class SharedHead(nn.Module):
    """A RetinaNet-like head: the same conv + CBN applied to every level."""

    def __init__(self):
        super().__init__()
        self.cls_convs = nn.ModuleList([
            ConvModule(4, 6, 3, padding=1, norm_cfg=CFG),
            ConvModule(6, 6, 3, padding=1, norm_cfg=CFG)
        ])

    def forward(self, levels):
        outs = []
        for x in levels:
            for conv in self.cls_convs:
                x = conv(x)
            outs.append(x)
        return outs


class Detector(nn.Module):

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bbox_head = SharedHead()

    def forward(self, levels):
        return self.bbox_head(levels)


def levels_of(it, sizes=(8, 4, 2)):
    gen = torch.Generator().manual_seed(it)
    return [torch.randn(2, 4, s, s, generator=gen) for s in sizes]


def trap_warnings(messages):
    return [m for m in messages if 'producer weights unchanged' in m]


def loss_of(outs):
    return sum((o**2).mean() for o in outs)


def test_shared_head_without_iteration_warns_once_naming_layer_and_fix(
        mmlogs):
    model = Detector()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for it in range(4):
        loss = loss_of(model(levels_of(it)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    warnings = trap_warnings(mmlogs.messages)
    # once per layer, each naming itself by its path in the model
    names = ['bbox_head.cls_convs.0.bn', 'bbox_head.cls_convs.1.bn']
    assert len(warnings) == 2, warnings
    for name, message in zip(names, warnings):
        assert name in message, message
        assert "dict(type='CBNHook')" in message
        assert 'mmcbn.set_cbn_iteration(model, iteration)' in message
    # and it is the trap: 12 calls were counted as 12 iterations
    assert model.bbox_head.cls_convs[0].bn.iteration == 11


def test_no_warning_when_the_iteration_is_given(mmlogs):
    model = Detector()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for it in range(4):
        set_cbn_iteration(model, it)
        loss = loss_of(model(levels_of(it)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not trap_warnings(mmlogs.messages)
    layer = model.bbox_head.cls_convs[0].bn
    assert layer.iteration == 3 and len(layer._windows) == 3


def test_no_warning_in_plain_training(mmlogs):
    """One call per iteration, backward and step in between."""
    model = Detector()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for it in range(6):
        loss = loss_of(model(levels_of(it, sizes=(8, ))))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not trap_warnings(mmlogs.messages)
    assert model.bbox_head.cls_convs[0].bn.iteration == 5


@pytest.mark.parametrize('set_to_none', [True, False])
def test_no_warning_with_gradient_accumulation(mmlogs, set_to_none):
    """Micro-batches with unchanged weights, a backward after each."""
    model = Detector()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        for micro in range(4):
            loss = loss_of(model(levels_of(4 * step + micro, sizes=(8, ))))
            (loss / 4).backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
    assert not trap_warnings(mmlogs.messages)


@pytest.mark.parametrize('skipping', ['grad_scaler', 'not_in_optimizer'])
def test_no_warning_when_weights_stay_unchanged_between_iterations(
        mmlogs, skipping):
    """The canonical loop (zero_grad, forward, backward, step) where the
    producer's weights do not change from one iteration to the next: a
    GradScaler skipping the steps whose scaled gradients overflow (as mixed
    precision does at its start), or weights the optimizer does not update.
    The gradients are reset before each forward, yet every call is its own
    iteration: a backward ran in between."""
    model = Detector()
    conv = model.bbox_head.cls_convs[0].conv
    if skipping == 'grad_scaler':
        params = list(model.parameters())
    else:
        params = [p for n, p in model.named_parameters()
                  if not n.startswith('bbox_head.cls_convs.0.conv')]
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.**100,
                                  growth_interval=1000)
    unchanged = 0
    for it in range(5):
        model.zero_grad(set_to_none=True)
        loss = loss_of(model(levels_of(it, sizes=(8, ))))
        before = conv.weight.detach().clone()
        if skipping == 'grad_scaler':
            # the first iterations overflow (inf gradients): steps skipped
            scaler.scale(loss * (1e30 if it < 3 else 1.)).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        unchanged += torch.equal(before, conv.weight.detach())
    assert unchanged >= 3  # the situation under test did occur
    assert not trap_warnings(mmlogs.messages)
    assert model.bbox_head.cls_convs[0].bn.iteration == 4


def test_names_are_looked_up_once_per_warning(mmlogs, monkeypatch):
    """The name lookup walks the call stack: only when a warning is given,
    never on every call of a trapped or unbound layer."""
    from mmcbn.cbn import _CrossIterationBatchNorm
    lookups = []
    original = _CrossIterationBatchNorm._caller_name

    def counted(self):
        lookups.append(self)
        return original(self)

    monkeypatch.setattr(_CrossIterationBatchNorm, '_caller_name', counted)
    model = Detector()
    for it in range(4):
        loss_of(model(levels_of(it))).backward()
    assert len(lookups) == 2 and len(set(map(id, lookups))) == 2


def test_unbound_warning_names_the_layer_without_the_hook(mmlogs):
    """The other warning a forward gives (no producer found) names the
    layer by its path too."""

    class Block(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3)
            self.act = nn.ReLU()
            self.norm = ConvModule(6, 6, 1, norm_cfg=CFG).bn

        def forward(self, x):
            return self.norm(self.act(self.conv(x)))

    model = nn.Sequential(nn.Identity(), Block())
    for it in range(3):
        model(levels_of(it, sizes=(6, ))[0]).sum().backward()
    found = [m for m in mmlogs.messages if 'found no producing' in m]
    assert len(found) == 1 and found[0].startswith('1.norm found no'), found
