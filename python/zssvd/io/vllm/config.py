"""vLLM quantization config ``zssvd``: found from config.json's ``quantization_config.quant_method``.

The block ``save_compressed`` writes (format v2, ``/docs/vllm.md``) lists every packed module by its
Hugging Face name. vLLM asks for a method per layer prefix; a fused layer (``qkv_proj``,
``gate_up_proj``) is looked up through the model's ``packed_modules_mapping`` as its checkpoint
modules. Layers none of whose modules are listed stay vLLM's ordinary ``UnquantizedLinearMethod``.
Before any weight is read, ``maybe_update_config`` runs zssvd's own ``verify_checkpoint`` on the
model directory, so an edited or corrupted checkpoint is refused with ``CheckpointError``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from .linear import ZSSVDLinearMethod

NAME = "zssvd"
FORMAT_VERSION = 2


class ZSSVDQuantConfig(QuantizationConfig):
    """Per-module layouts of a zssvd checkpoint, as vLLM's quantization config."""

    # remap's and fp8's per-component ``v_scale`` are not KV-cache scales: vLLM must neither rename
    # them to ``.attn.v_scale`` nor drop them as unexpected.
    _ignore_unexpected_suffixes = ()

    def __init__(self, modules: dict[str, dict], dtype: str | None = None):
        super().__init__()
        self.modules, self.dtype = modules, dtype

    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # Triton's minimum; fp8 codes are decoded from the bits before sm_89

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ZSSVDQuantConfig":
        from ..checkpoint import CheckpointError

        version = config.get("format_version")
        if config.get("quant_method") != NAME or version != FORMAT_VERSION or "modules" not in config:
            raise CheckpointError(f"quantization_config (quant_method {config.get('quant_method')!r}, format "
                                  f"version {version!r}) is not a zssvd format {FORMAT_VERSION} block; "
                                  "re-create the checkpoint with this zssvd's `zssvd compress`")
        return cls(config["modules"], config.get("dtype"))

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None):
        from ..checkpoint import verify_checkpoint

        verify_checkpoint(_local_dir(model_name, revision))

    @staticmethod
    def get_cache_scale_mapper():
        from vllm.model_executor.models.utils import WeightsMapper

        return WeightsMapper()  # zssvd checkpoints carry no KV-cache scales (see above)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self.modules = hf_to_vllm_mapper.apply_dict(self.modules)

    def checkpoint_modules(self, prefix: str) -> list[str]:
        """The checkpoint module names behind a vLLM layer prefix (several for a fused layer)."""
        parent, _, leaf = prefix.rpartition(".")
        subs = self.packed_modules_mapping.get(leaf)
        return [f"{parent}.{sub}" if parent else sub for sub in subs] if subs else [prefix]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        names = self.checkpoint_modules(prefix)
        if not any(name in self.modules for name in names):
            return UnquantizedLinearMethod()
        return ZSSVDLinearMethod(names, [self.modules.get(name) for name in names])


def _local_dir(model: str, revision: str | None) -> Path:
    """The checkpoint directory: ``model`` itself, or the hub snapshot vLLM downloaded."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, revision=revision, local_files_only=True))
