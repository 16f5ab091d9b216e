"""The ``config.json`` of a zssvd checkpoint: ``model_type: "zssvd"`` around the base model's config.

A plain transformers install therefore refuses the directory loudly: it cannot quietly load a LLaMA
with randomly initialised layers in place of the packed ones. ``hf.py`` makes the Auto classes
aware of these checkpoints; ``checkpoint.py`` writes and reads them. This module imports neither.
"""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

MODEL_TYPE = "zssvd"
# The remote code a checkpoint carries (``trust_remote_code=True``): it imports the installed package.
REMOTE_CODE = {
    "configuration_zssvd.py": "from zssvd.io.hf_config import ZSSVDConfig  # noqa: F401  (needs: pip install zssvd)\n",
    "modeling_zssvd.py": "from zssvd.io.hf import ZSSVDForCausalLM  # noqa: F401  (needs: pip install zssvd)\n",
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


def wrapped_config(base: PretrainedConfig) -> ZSSVDConfig:
    """The config.json written into a checkpoint."""
    base_dict = base.to_dict()
    base_dict.pop("quantization_config", None)  # a GGUF source's leftovers; our weights are plain tensors
    config = ZSSVDConfig(base_config=base_dict, architectures=["ZSSVDForCausalLM"])
    config.auto_map = dict(AUTO_MAP)
    return config
