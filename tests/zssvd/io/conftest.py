"""Fixtures of the checkpoint tests; the helpers they use live in ``checkpoint_helpers.py``."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint_helpers import LOADERS, STORAGES  # noqa: E402
from tiny_models import random_windows  # noqa: E402


@pytest.fixture
def ids():
    return random_windows(2, 12, seed=9)


@pytest.fixture(params=STORAGES)
def storage(request):
    return request.param


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def version(request):
    return request.param


@pytest.fixture(params=list(LOADERS))
def loader(request):
    return LOADERS[request.param]
