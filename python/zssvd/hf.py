"""Hugging Face integration: ``AutoModelForCausalLM.from_pretrained`` on a zssvd checkpoint.

A checkpoint's ``config.json`` has ``model_type: "zssvd"`` and keeps the base model's config under
``base_config``. A plain transformers install therefore refuses the directory loudly: it cannot
quietly load a LLaMA with randomly initialised layers in place of the packed ones. Two ways in:

* ``import zssvd`` registers ``ZSSVDConfig`` / ``ZSSVDForCausalLM`` with the Auto classes, so
  ``AutoModelForCausalLM.from_pretrained(DIR)`` works in that process;
* ``trust_remote_code=True``: the checkpoint carries two small files (``configuration_zssvd.py``,
  ``modeling_zssvd.py``) that import these classes from the installed zssvd package.

Either way the model is built by ``zssvd.load`` and is the base architecture's own class
(``LlamaForCausalLM``, ...) with packed layers, so ``generate`` and evaluation harnesses work.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

MODEL_TYPE = "zssvd"
REMOTE_CODE = {
    "configuration_zssvd.py": "from zssvd.hf import ZSSVDConfig  # noqa: F401  (needs: pip install zssvd)\n",
    "modeling_zssvd.py": "from zssvd.hf import ZSSVDForCausalLM  # noqa: F401  (needs: pip install zssvd)\n",
}
AUTO_MAP = {"AutoConfig": "configuration_zssvd.ZSSVDConfig",
            "AutoModelForCausalLM": "modeling_zssvd.ZSSVDForCausalLM"}


class ZSSVDConfig(PretrainedConfig):
    """Wraps the base model's config (``base_config``) of a compressed checkpoint."""

    model_type = MODEL_TYPE

    def __init__(self, base_config: dict | None = None, **kwargs):
        self.base_config = base_config or {}
        super().__init__(**kwargs)

    def to_base(self) -> PretrainedConfig:
        base = dict(self.base_config)
        return AutoConfig.for_model(base.pop("model_type"), **base)


class ZSSVDForCausalLM(PreTrainedModel):
    """Loader only: ``from_pretrained`` returns the base architecture with packed layers."""

    config_class = ZSSVDConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        from .checkpoint import load

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


def wrapped_config(base: PretrainedConfig) -> ZSSVDConfig:
    """The config.json written into a checkpoint."""
    base_dict = base.to_dict()
    base_dict.pop("quantization_config", None)  # a GGUF source's leftovers; our weights are plain tensors
    config = ZSSVDConfig(base_config=base_dict, architectures=["ZSSVDForCausalLM"])
    config.auto_map = dict(AUTO_MAP)
    return config
