"""Peak memory by stage (zssvd.runtime.memory) and its place in report.json."""
import copy
import json
import mmap
import pickle
import time

import pytest
import torch

from tiny_models import random_windows, tiny_model
from zssvd.config import CompressionConfig
from zssvd.pipeline import AnalysisOptions, analyze, compress
import zssvd.runtime.memory as memory_module
from zssvd.runtime.memory import (MemoryTracker, map_large_blocks, peak_resident_bytes, resident_bytes,
                                  return_freed_memory, summary_line)
from zssvd.stages.calibration import CalibrationSet


def seen_while_held(record, held: int, slack: int = 2 ** 22, timeout: float = 30.0) -> None:
    """Wait (while the caller holds its allocation) until the sampler thread has seen it: on a loaded
    machine the thread may not run for a while, and the kernel's high-water mark cannot help in a
    process (the whole test session) whose record was set long before."""
    deadline = time.monotonic() + timeout
    while record.peak < held - slack and time.monotonic() < deadline:
        time.sleep(0.005)


def test_a_stage_that_allocates_sees_its_allocation_and_its_parent_sees_it_too():
    tracker = MemoryTracker(interval=0.001)
    size = 64 * 2 ** 20
    with tracker.stage("outer"):
        with tracker.stage("inner") as record:
            # Fresh pages from the kernel, touched: in a long test session torch's allocator may serve
            # even 64 MiB from memory that is already resident, so the allocation is mapped directly.
            block = mmap.mmap(-1, size)
            torch.frombuffer(block, dtype=torch.uint8).fill_(1)
            held = resident_bytes()
            seen_while_held(record, held)
            block.close()  # unmapped: the pages go back to the system at once
        with tracker.stage("after"):
            pass
    stages = tracker.by_stage
    assert stages["inner"]["peak_bytes"] >= stages["inner"]["start_bytes"] + size * 0.9
    assert stages["inner"]["peak_bytes"] >= held - 2 ** 22  # the kernel's counters lag by a few pages per thread
    assert stages["outer"]["peak_bytes"] >= stages["inner"]["peak_bytes"]
    # "after" began once the 64 MiB were unmapped
    assert stages["after"]["peak_bytes"] < stages["inner"]["peak_bytes"] - size // 2
    assert not any(s["cached"] for s in stages.values())
    assert tracker.summary()["peak_bytes"] >= max(peak_resident_bytes(), stages["inner"]["peak_bytes"])


def test_a_repeated_stage_keeps_its_largest_peak_and_a_discarded_record_leaves_nothing():
    tracker = MemoryTracker(interval=0.001)
    with tracker.stage("round"):
        block = torch.ones(32 * 2 ** 20 // 4)
        del block
    first = tracker.by_stage["round"]["peak_bytes"]
    with tracker.stage("round"):
        pass
    # never the second round's smaller figure (it may be a page above: resident memory drifts by pages)
    assert tracker.by_stage["round"]["peak_bytes"] >= first
    with tracker.stage("lookup", cached=True) as record:
        record.keep = False
    assert "lookup" not in tracker.by_stage
    copied = pickle.loads(pickle.dumps(tracker))  # an Analysis holding it can be copied or pickled
    assert copied.by_stage == tracker.by_stage and copied.copy().by_stage == tracker.by_stage


def test_report_json_carries_the_peak_and_every_stage(tmp_path):
    model = tiny_model("llama")
    calib = CalibrationSet(random_windows(4, 16, seed=3), "random")
    options = AnalysisOptions(cache_dir=str(tmp_path), source="tiny")
    _, report = compress(copy.deepcopy(model), calib, CompressionConfig(ratio=0.6), options=options)
    memory = json.loads(json.dumps(report["memory"]))  # what report.json gets
    stages = memory["by_stage"]
    assert {"calibration_pass", "whitening", "decomposition", "scores", "selection", "packing",
            "cache_store:stats", "cache_store:factors"} <= set(stages)
    for name, s in stages.items():
        assert 0 < s["start_bytes"] <= s["peak_bytes"] <= memory["peak_bytes"], name
        assert s["end_bytes"] <= s["peak_bytes"], name
        assert s["cached"] is False, name
    assert memory["peak_bytes"] < 64 * 2 ** 30  # a tiny model: a sane number, not a unit slip
    assert "peak memory" in summary_line(memory)
    parts = memory["components"]
    cfg = model.config
    h, i = cfg.hidden_size, cfg.intermediate_size
    assert parts["gradient_sinks"] == 4 * report["target_params"]
    assert parts["covariances"] == 8 * cfg.num_hidden_layers * (3 * h * h + i * i)  # q/k/v, o, gate/up, down
    assert parts["step_windows"] == 1  # the default micro-batch on the CPU
    assert parts["logits_per_step"] == 1 * 16 * cfg.vocab_size * 4
    assert parts["activations_per_step"] >= 0

    # A second run reads both entries from the cache: they appear as cached stages, the work does not.
    _, again = compress(copy.deepcopy(model), calib, CompressionConfig(ratio=0.6), options=options)
    stages = again["memory"]["by_stage"]
    assert stages["calibration_pass"]["cached"] and stages["factors"]["cached"]
    assert "whitening" not in stages and "decomposition" not in stages
    assert again["ranks"] == report["ranks"]


def test_analysis_reused_for_two_ratios_reports_each_compression_separately():
    model = tiny_model("qwen2")
    calib = CalibrationSet(random_windows(4, 16, seed=1), "random")
    analysis = analyze(model, calib)
    _, a = compress(copy.deepcopy(model), calib, CompressionConfig(ratio=0.5), analysis=analysis)
    _, b = compress(copy.deepcopy(model), calib, CompressionConfig(ratio=0.7), analysis=analysis)
    assert "selection" not in analysis.memory.by_stage  # the analysis keeps only its own stages
    assert {"selection", "packing"} <= set(a["memory"]["by_stage"]) & set(b["memory"]["by_stage"])
    assert a["memory"]["by_stage"]["calibration_pass"] == b["memory"]["by_stage"]["calibration_pass"]


def test_stages_opened_right_after_others_close_never_wait_for_the_old_sampler():
    import threading

    tracker = MemoryTracker(interval=0.0005)

    def churn():
        for i in range(300):
            with tracker.stage(f"s{i % 3}"):
                pass

    worker = threading.Thread(target=churn, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "a new stage waited on the lock held by the stopping sampler"
    assert set(tracker.by_stage) == {"s0", "s1", "s2"}


def _glibc_present() -> bool:
    from zssvd.runtime import memory

    return memory._glibc() is not None


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "1M"])
def test_a_bad_mmap_threshold_is_refused_in_one_line(bad):
    with pytest.raises(ValueError, match="positive number of bytes"):
        map_large_blocks(bad)


_MAPPED_BLOCKS_CHECK = """
import torch
from zssvd.runtime.memory import map_large_blocks, resident_bytes, return_freed_memory
assert map_large_blocks()
before = resident_bytes()
held = [torch.ones(2 ** 19) for _ in range(128)]  # 2 MiB each, 256 MiB in all, each written
grown = resident_bytes() - before
del held
print(grown, resident_bytes() - before, isinstance(return_freed_memory(), bool))
"""


@pytest.mark.skipif(not _glibc_present(), reason="glibc's malloc controls")
def test_with_large_blocks_mapped_freed_tensors_leave_the_process():
    """In a fresh interpreter: a long test session's earlier allocations decide where a block comes from."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MAPPED_BLOCKS_CHECK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grown, left, trimmed = out.stdout.split()
    assert int(grown) > 200 * 2 ** 20 and int(left) < 32 * 2 ** 20 and trimmed == "True"


def test_without_glibc_the_memory_calls_change_nothing(monkeypatch):
    from zssvd.runtime import memory

    monkeypatch.setattr(memory, "_glibc", lambda: None)
    assert map_large_blocks() is False and return_freed_memory() is False


class _RecordingLibc:
    """Stands in for glibc: records what the pipeline asks of the allocator."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("threshold", value) if param == memory_module.M_MMAP_THRESHOLD else ("mallopt", param))
        return 1

    def malloc_trim(self, pad):
        self.calls.append("trim")
        return 1


MAPPED, SETTLED = ("threshold", memory_module.LARGE_BLOCK_BYTES), ("threshold", memory_module.SETTLED_THRESHOLD_BYTES)


def test_the_calibration_pass_maps_large_blocks_and_trims_at_its_end_even_after_an_error(monkeypatch):
    import zssvd.stages.gradients as gradients
    from zssvd.io.models import find_targets

    libc = _RecordingLibc()
    monkeypatch.setattr(memory_module, "_glibc", lambda: libc)
    model = tiny_model("llama")
    targets = find_targets(model, None)
    gradients.calibration_pass(model, targets, random_windows(2, 8, seed=1), micro_batch=1)
    assert libc.calls == [MAPPED, SETTLED, "trim"]  # the process gets a settled threshold back at the end
    with pytest.raises(ValueError, match="order must be"):  # refused before any work: nothing to give back
        gradients.calibration_pass(model, targets, random_windows(2, 8, seed=1), order="sideways")
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        gradients.calibration_pass(model, targets, torch.zeros(1, 8, dtype=torch.int64))
    assert libc.calls == [MAPPED, SETTLED, "trim"] * 2


def test_the_threshold_holds_across_the_whole_pipeline_and_is_settled_once_at_its_end(monkeypatch):
    import zssvd
    from zssvd.config import AnalysisOptions
    from zssvd.stages.calibration import CalibrationSet

    libc = _RecordingLibc()
    monkeypatch.setattr(memory_module, "_glibc", lambda: libc)
    model = tiny_model("llama")
    calib = CalibrationSet(random_windows(2, 8, seed=1), source="random")
    zssvd.compress(model, calib, zssvd.CompressionConfig(ratio=0.8), options=AnalysisOptions(cache_dir=None))
    # nested scopes (compress_, analyze, each gradient pass) share one setting, settled after the last stage
    assert libc.calls[0] == MAPPED and libc.calls[-1] == SETTLED
    assert set(libc.calls[1:-1]) == {"trim"}
