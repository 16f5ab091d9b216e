"""Constants and helpers shared by the vLLM tests (the fixtures are in conftest.py)."""
from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from zssvd.io.vllm.check import shutdown, threads_bind

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for 135M parameters

# The tests' checkpoints: (name, storage, ratio). Small calibration to keep CI short (stated in
# docs/vllm.md); bench/bench_vllm.py uses the 32 x 512 windows of the issue.
CHECKPOINTS = {"dense": ("dense", 0.8), "remap": ("remap", 0.8), "hq": ("hq", 0.4), "int4": ("int4", 0.25)}
CALIB_SAMPLES, CALIB_LEN = 4, 256
WIKITEXT = Path("/work/shared/data/wikitext-2/valid.txt")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three laws of thermodynamics state that"]
NEW_TOKENS = 64
MAX_MODEL_LEN = 256


def need_vllm():
    """Skip unless vLLM (not just a folder named vllm) is importable."""
    pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (see docs/vllm.md; CI runs these "
                                                        "tests in .venv-vllm)")


class Engines:
    """One vLLM engine at a time, kept while consecutive tests ask for the same (checkpoint, tp, mode)."""

    def __init__(self):
        self.key, self.llm = None, None

    def get(self, directory: Path, tp: int, eager: bool = True):
        """Eager unless asked: torch.compile (vLLM's default) takes 5-10 minutes per engine on a
        2-core machine, so one test runs it (test_generation.py's compiled case)."""
        from vllm import LLM

        if self.key != (directory, tp, eager):
            self.close()
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind(tp)
            self.llm = LLM(str(directory), dtype="float32", tensor_parallel_size=tp, max_model_len=MAX_MODEL_LEN,
                           seed=0, enforce_eager=eager, distributed_executor_backend="mp" if tp > 1 else None)
            self.key = (directory, tp, eager)
        return self.llm

    def close(self):
        if self.llm is not None:
            shutdown(self.llm)
            self.llm, self.key = None, None
            gc.collect()
