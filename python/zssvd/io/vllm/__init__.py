"""Serving zssvd checkpoints with vLLM (``vllm.LLM(DIR)``, ``vllm serve DIR``), tensor parallelism included.

``register`` is the ``vllm.general_plugins`` entry point (pyproject.toml), so the engine and every
worker process call it before reading a config: it registers the quantization method ``zssvd``
(``config.ZSSVDQuantConfig``), which vLLM then picks from config.json's
``quantization_config.quant_method``. ``sharding`` (tensor-parallel slices, plain torch) does not
import vLLM; ``config`` and ``linear`` do. Design notes: ``docs/vllm.md``.
"""
from __future__ import annotations


def register() -> None:
    """Register the ``zssvd`` quantization method with vLLM (idempotent; vLLM may call it many times)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    from .config import NAME, ZSSVDQuantConfig

    if NAME not in QUANTIZATION_METHODS:
        register_quantization_config(NAME)(ZSSVDQuantConfig)


__all__ = ["register"]
