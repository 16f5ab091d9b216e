"""Hugging Face integration: ``AutoModelForCausalLM.from_pretrained`` on a zssvd checkpoint.

A checkpoint's ``config.json`` has ``model_type: "zssvd"`` (``hf_config.py``). Two ways in:

* ``zssvd.register_hf()`` (``register`` here; ``zssvd.load`` calls it too) registers ``ZSSVDConfig`` /
  ``ZSSVDForCausalLM`` with the Auto classes, so ``AutoModelForCausalLM.from_pretrained(DIR)`` works
  in that process. ``import zssvd`` alone registers nothing;
* ``trust_remote_code=True``: the checkpoint carries two small files (``configuration_zssvd.py``,
  ``modeling_zssvd.py``) that import these classes from the installed zssvd package.

Either way the model is built by ``zssvd.load`` and is the base architecture's own class
(``LlamaForCausalLM``, ...) with packed layers, so ``generate`` and evaluation harnesses work.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .checkpoint import load
from .hf_config import MODEL_TYPE, ZSSVDConfig

__all__ = ["ZSSVDConfig", "ZSSVDForCausalLM", "register"]


class ZSSVDForCausalLM(PreTrainedModel):
    """Loader only: ``from_pretrained`` returns the base architecture with packed layers."""

    config_class = ZSSVDConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        device = kwargs.get("device_map") or kwargs.get("device") or "cpu"
        if not isinstance(device, str):
            raise ValueError("zssvd checkpoints load onto one device: pass device_map='cpu' or 'cuda'")
        return load(pretrained_model_name_or_path, device="cuda" if device == "auto" else device)


def register() -> None:
    """Make the Auto classes aware of zssvd checkpoints (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, ZSSVDConfig)
        AutoModelForCausalLM.register(ZSSVDConfig, ZSSVDForCausalLM)
    except ValueError:
        pass  # already registered
