"""Fixtures shared by the kernel tests."""
import pytest
import torch

from zskernels import _triton


@pytest.fixture
def poison_empty(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so any output element a kernel skips shows up."""
    monkeypatch.setattr(_triton, "POISON", True)


@pytest.fixture
def one_thread():
    """CPU timings and int8pack/int4pack paths on one thread (the paths' thresholds were measured so)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
