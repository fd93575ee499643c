# Copyright (c) mmcbn contributors. All rights reserved.
"""Fake traces (``FakeTensorMode``, as meta-init and export tools use) and
real training steps in one process, in any order: no module-level cache
may hand a tensor of one mode to another."""
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from mmcbn import CBN2d, set_cbn_iteration


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), CBN2d(4, window=2), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False),
        CBN2d(4, window=3, compensate='upstream'))


def _steps(model, n=4):
    gen = torch.Generator().manual_seed(1)
    outputs = []
    for it in range(n):
        set_cbn_iteration(model, it)
        x = torch.randn(2, 3, 6, 6, generator=gen)
        y = model(x)
        y.square().mean().backward()
        outputs.append(y.detach())
    return outputs


def _fake_trace():
    with FakeTensorMode():
        model = _model()  # its parameters are fake, as under meta-init
        outputs = _steps(model)
    assert all(type(o).__name__ == 'FakeTensor' for o in outputs)
    assert model[1].bindings[0].status == 'bound'  # a real CBN trace


@pytest.mark.parametrize('order', [('fake', 'real'), ('real', 'fake'),
                                   ('fake', 'fake', 'real')])
def test_fake_traces_and_real_steps_mix(order):
    reference = _steps(_model())  # a real run before anything fake
    for kind in order:
        if kind == 'fake':
            _fake_trace()
        else:
            again = _steps(_model())
            for a, b in zip(again, reference):
                assert torch.equal(a, b)
