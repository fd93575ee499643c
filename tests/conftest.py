# Copyright (c) mmcbn contributors. All rights reserved.
import logging

import pytest
from mmengine.logging import MMLogger


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
def mmlogs():
    """Messages logged through mmengine's current MMLogger."""
    logger = MMLogger.get_current_instance()
    handler = _Collect()
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
