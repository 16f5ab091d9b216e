"""Test setup shared by every test file.

Without CUDA, Triton kernels run in Triton's CPU interpreter: the variable must be set
before triton is first imported, so it is set here, at collection time.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

# Test files in subfolders (tests/zssvd/stages/...) import the shared helpers (tiny_models) from tests/.
# With tests/ on the path, its folders zssvd/ and zskernels/ would pass for namespace packages and hide
# the real ones, so the sources come first.
TESTS = Path(__file__).resolve().parent
for _path in (TESTS, TESTS.parent, TESTS.parent / "python"):
    if str(_path) in sys.path:
        sys.path.remove(str(_path))
    sys.path.insert(0, str(_path))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def rng():
    """A seeded generator so every test draws fresh but reproducible random data."""
    return torch.Generator().manual_seed(1234)
