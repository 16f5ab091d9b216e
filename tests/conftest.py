"""Test setup shared by every test file.

Without CUDA, Triton kernels run in Triton's CPU interpreter: the variable must be set
before triton is first imported, so it is set here, at collection time.
"""
import os

import pytest
import torch

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
