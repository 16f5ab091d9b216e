"""zssvd: Zero-Sum SVD compression of Hugging Face causal language models.

    import zssvd
    model, tokenizer, _ = zssvd.load_model("path/to/model")
    calib = zssvd.calibration.from_files(tokenizer, ["wiki.valid.txt"], num_samples=32, seq_len=512)
    analysis = zssvd.analyze(model, calib)                        # prepare: stages 1-4, model unchanged
    model, report = zssvd.compress_(model, calib, zssvd.CompressionConfig(ratio=0.8), analysis=analysis)
    zssvd.save_compressed(model, "out", tokenizer=tokenizer, report=report)
    model = zssvd.load("out")

``import zssvd`` has no side effects and imports neither Triton nor the optional extras: the names
below are imported on first use. ``zssvd.register_hf()`` (or the first ``zssvd.load``) makes
``AutoModelForCausalLM.from_pretrained`` understand zssvd checkpoints.
"""
from __future__ import annotations

import importlib

from ._version import __version__

# public name -> (module, attribute); attribute None: the module itself
_LAZY = {
    "Analysis": ("zssvd.pipeline", "Analysis"),
    "AnalysisOptions": ("zssvd.config", "AnalysisOptions"),
    "CompressionConfig": ("zssvd.config", "CompressionConfig"),
    "CheckpointError": ("zssvd.io.checkpoint", "CheckpointError"),
    "verify_checkpoint": ("zssvd.io.checkpoint", "verify_checkpoint"),
    "analyze": ("zssvd.pipeline", "analyze"),
    "prepare": ("zssvd.pipeline", "prepare"),
    "compress": ("zssvd.pipeline", "compress"),
    "compress_": ("zssvd.pipeline", "compress_"),
    "convert": ("zssvd.pipeline", "convert"),
    "calibration": ("zssvd.stages.calibration", None),
    "find_targets": ("zssvd.io.models", "find_targets"),
    "load_model": ("zssvd.io.models", "load_model"),
    "perplexity": ("zssvd.evaluation.evaluate", "perplexity"),
    "save_compressed": ("zssvd.io.checkpoint", "save_compressed"),
}
__all__ = sorted([*_LAZY, "load", "register_hf"])


def register_hf() -> None:
    """Register zssvd checkpoints with transformers (idempotent): the ``zssvd`` quantizer for format-2
    checkpoints and the Auto classes for format-1 ones, so that ``AutoModelForCausalLM.from_pretrained(DIR)``
    loads them in this process."""
    from .io.hf import register

    register()


def load(directory, *, device=None, verify: bool = True, dtype=None, device_map=None, max_memory=None):
    """Load a compressed model written by ``save_compressed`` (or ``zssvd compress``); checks sizes and
    SHA-256 unless ``verify=False``; ``dtype`` casts float weights to a compute dtype (default: as stored).
    ``device``: one device (default the CPU); ``device_map`` ("auto", ..., or {module prefix: device}) and
    ``max_memory``: across devices, CPU and disk (``zssvd.io.checkpoint.load``).
    Registers the Hugging Face integration on first use."""
    from .io.checkpoint import load as load_checkpoint

    register_hf()
    return load_checkpoint(directory, device=device, verify=verify, dtype=dtype, device_map=device_map,
                           max_memory=max_memory)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'zssvd' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attribute is None else getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_LAZY})
