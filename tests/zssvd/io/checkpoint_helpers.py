"""Compressed tiny models and checkpoints of both formats, shared by the checkpoint tests (``conftest.py``
puts this folder on the path).

Compressing is the slow part (seconds per model on a busy CPU): each (arch, storage, dtype) is
compressed once per session and handed out as a deep copy.
"""
import copy
import json
import os

import torch
from safetensors.torch import save_file

import zssvd
from tiny_models import random_windows, tiny_model
from zssvd.config import CompressionConfig
from zssvd.io.checkpoint import MANIFEST, WEIGHTS, _unique_state, file_sha256
from zssvd.io.hf_config import REMOTE_CODE, wrapped_config
from zssvd.nn import describe_packed
from zssvd.pipeline import AnalysisOptions
from zssvd.stages.calibration import CalibrationSet

STORAGES = ("dense", "remap", "hq", "int4")
RATIOS = {"dense": 0.6, "remap": 0.6, "hq": 0.4, "int4": 0.3}  # hq stores at most half the 16-bit size
# int4: groups of 16 (the tiny models' 32-wide rows hold two; g = 64 would pad each row to 64), ratio <= 0.375
OPTIONS = {"int4": {"group_size": 16}}
_CACHE = {}


def compress_tiny(arch="llama", storage="dense", dtype=torch.float32, model=None):
    """(compressed model, report) of a tiny random model (or of ``model``), cached unless ``model`` is given."""
    key = (arch, storage, dtype)
    if model is not None or key not in _CACHE:
        source = model if model is not None else tiny_model(arch, dtype=dtype)
        calib = CalibrationSet(random_windows(4, 16, seed=3), "random")
        result = zssvd.compress(source, calib, CompressionConfig(ratio=RATIOS[storage], storage=storage,
                                                                 **OPTIONS.get(storage, {})),
                                options=AnalysisOptions(score_backend="torch"))
        if model is not None:
            return result
        _CACHE[key] = result
    return copy.deepcopy(_CACHE[key])


def save_v1(model, out):
    """A format-1 checkpoint as zssvd 0.1 wrote it: model_type "zssvd" wrapper, remote code, model dtype."""
    out.mkdir(parents=True, exist_ok=True)
    wrapped_config(model.config).save_pretrained(out)
    for name, code in REMOTE_CODE.items():
        (out / name).write_text(code)
    state, aliases = _unique_state(model)
    save_file(state, out / WEIGHTS, metadata={"format": "pt", "zssvd_format": "1"})
    manifest = {"format_version": 1, "zssvd_version": "0.1.0",
                "architecture": (model.config.architectures or [type(model).__name__])[0],
                "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                "modules": describe_packed(model), "tied": aliases,
                "files": {WEIGHTS: {"bytes": (out / WEIGHTS).stat().st_size, "sha256": file_sha256(out / WEIGHTS)}}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def save_checkpoint(model, out, version, report=None):
    """Write ``model`` in format ``version`` (1 or 2)."""
    if version == 1:
        return save_v1(model, out)
    return zssvd.save_compressed(model, out, report=report)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def hf_from_pretrained(directory, **kwargs):
    from transformers import AutoModelForCausalLM

    zssvd.register_hf()
    return AutoModelForCausalLM.from_pretrained(directory, **kwargs)


LOADERS = {"zssvd.load": lambda d: zssvd.load(d), "from_pretrained": hf_from_pretrained}


def disk_env():
    """Environment for subprocesses: the sources first, as tests/conftest.py arranges for pytest."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "python"), str(root), env.get("PYTHONPATH", "")])
    return env
