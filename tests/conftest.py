import os
import sys

import pytest
import torch

# Tests import the top-level scripts (supermask.py, train.py, ...) as modules.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Without a GPU, Triton kernels run in Triton's interpreter; it is chosen when a kernel is defined, so
# before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer than the 5-minute suite allows; run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with `make test-slow` or `pytest --runslow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
