# Copyright (c) mmcbn contributors. All rights reserved.
import logging
import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from mmengine.logging import MMLogger

# Property-based tests: deterministic and quick in CI (the same examples on
# every run, no example database); HYPOTHESIS_PROFILE=thorough draws many
# more, randomly, for a local search.
settings.register_profile(
    'ci',
    derandomize=True,
    deadline=None,
    database=None,
    max_examples=50,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    'thorough',
    deadline=None,
    database=None,
    max_examples=1000,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))


class _Collect(logging.Handler):

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    @property
    def messages(self):
        return [r.getMessage() for r in self.records]


@pytest.fixture
def mmlogs(monkeypatch):
    """Messages logged through any MMLogger (a runner makes its own)."""
    handler = _Collect()
    for logger in MMLogger._instance_dict.values():
        logger.addHandler(handler)
    original_init = MMLogger.__init__

    def init_and_collect(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.addHandler(handler)

    monkeypatch.setattr(MMLogger, '__init__', init_and_collect)
    yield handler
    for logger in MMLogger._instance_dict.values():
        logger.removeHandler(handler)


#: Devices the numeric tests run on. CI has no GPU: the CUDA cases are
#: reported as skipped, with the reason, and run wherever CUDA exists.
DEVICES = [
    'cpu',
    pytest.param(
        'cuda',
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(),
            reason='CUDA is not available (CI has no GPU)')),
]


@pytest.fixture(params=DEVICES)
def device(request):
    """Run a test on the CPU and, where available, on CUDA."""
    return torch.device(request.param)
