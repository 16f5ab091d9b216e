"""Hugging Face integration: ``AutoModelForCausalLM.from_pretrained`` on a zssvd checkpoint.

``zssvd.register_hf()`` (``register`` here; ``zssvd.load`` calls it too) makes transformers understand
both checkpoint formats in this process; ``import zssvd`` alone registers nothing.

* Format 2 (what ``save_compressed`` writes): config.json is the source architecture's own with a
  ``quantization_config`` of ``quant_method: "zssvd"``; the quantizer in ``hf_quantizer.py`` loads it.
  Without zssvd registered, transformers warns that it does not know the quantisation method and
  loads the base architecture with the compressed layers missing -- register first.
* Format 1 (zssvd 0.1): config.json has ``model_type: "zssvd"`` (``hf_config.py``); ``ZSSVDConfig`` /
  ``ZSSVDForCausalLM`` are registered with the Auto classes, and ``trust_remote_code=True`` finds them
  through the two small files the checkpoint carries (``configuration_zssvd.py``, ``modeling_zssvd.py``).

Either way the model is the base architecture's own class (``LlamaForCausalLM``, ...) with packed
layers, so ``generate`` and evaluation harnesses work.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .checkpoint import load
from .hf_config import MODEL_TYPE, ZSSVDConfig

__all__ = ["ZSSVDConfig", "ZSSVDForCausalLM", "register"]


class ZSSVDForCausalLM(PreTrainedModel):
    """Format-1 loader only: ``from_pretrained`` returns the base architecture with packed layers."""

    config_class = ZSSVDConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        device_map = kwargs.get("device_map")  # a device, "auto", ... or a dict: zssvd.load places it
        device = None if device_map is not None else kwargs.get("device")
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return load(pretrained_model_name_or_path, device=device, device_map=device_map,
                    max_memory=kwargs.get("max_memory"), dtype=dtype if isinstance(dtype, torch.dtype) else None)


def register() -> None:
    """Make transformers aware of zssvd checkpoints, both formats (idempotent)."""
    from .hf_quantizer import register as register_quantizer

    register_quantizer()
    try:
        AutoConfig.register(MODEL_TYPE, ZSSVDConfig)
        AutoModelForCausalLM.register(ZSSVDConfig, ZSSVDForCausalLM)
    except ValueError:
        pass  # already registered
