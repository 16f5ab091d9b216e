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


@pytest.fixture
def record_launches(monkeypatch):
    """``record_launches(module)``: from then on, every launch of that kernel module as a dict (kernel,
    grid, named arguments, and the split-K counters as they were before and after the launch)."""
    def start(module) -> list[dict]:
        seen, real = [], module.launch

        class launch:  # noqa: N801 -- used as launch(kernel)[grid](*args), like _triton.launch
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    named = {**dict(zip(self.kernel.arg_names, args)), **kwargs}
                    cnt = named["cnt_ptr"] if named.get("LAST_SUMS") else None
                    before = None if cnt is None else cnt.clone()
                    real(self.kernel)[grid](*args, **kwargs)
                    seen.append(dict(kernel=self.kernel, grid=tuple(grid), args=named, cnt_before=before,
                                     cnt_after=None if cnt is None else cnt.clone()))
                return run

        monkeypatch.setattr(module, "launch", launch)
        return seen

    return start


@pytest.fixture
def split_calls_repeat(record_launches):
    """``split_calls_repeat(module, call_a, call_b)``: runs a, b, a again; the two a's must be bit-identical
    and finite (each call zeroes fresh split-K counters: stale ones would leave tiles of a NaN-poisoned
    output unwritten), at least three launches must have split K, each with zeroed counters. Returns b's
    result for the caller's own accuracy check."""
    def check(module, call_a, call_b):
        seen = record_launches(module)
        first, other, again = call_a(), call_b(), call_a()
        assert torch.equal(first, again) and torch.isfinite(first).all()
        split = [la for la in seen if la["args"]["LAST_SUMS"]]
        assert len(split) >= 3  # stage 1 of every call splits K
        assert all(not la["cnt_before"].any() for la in split)
        return other

    return check


def assert_split_launch(la: dict, split: int) -> None:
    """One recorded launch with ``split`` K splits: counters zero before it, every split of every tile
    arrived once (``record_launches``)."""
    assert la["grid"][1] == split and la["args"]["LAST_SUMS"] == (split > 1)
    if split > 1:
        assert not la["cnt_before"].any() and la["cnt_before"].numel() == la["grid"][0]
        assert torch.equal(la["cnt_after"], torch.full_like(la["cnt_after"], split))


@pytest.fixture
def check_split():
    """``assert_split_launch``, for the kernel test files (a fixture: they do not import conftest)."""
    return assert_split_launch
