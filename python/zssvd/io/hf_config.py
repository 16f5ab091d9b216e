"""Format 1 (zssvd 0.1) ``config.json``: ``model_type: "zssvd"`` around the base model's config.

Format 2 checkpoints keep the source architecture in config.json and describe the compression in its
``quantization_config`` (``checkpoint.py``, ``hf_quantizer.py``). This module stays so that format-1
checkpoints still load (``checkpoint.load`` reads their ``base_config``; their remote code imports
``ZSSVDConfig`` from here) and so that tests can write one (``wrapped_config``, ``REMOTE_CODE``).
It imports neither ``hf.py`` nor ``checkpoint.py``.
"""
from __future__ import annotations

from transformers import PretrainedConfig

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


def wrapped_config(base: PretrainedConfig) -> ZSSVDConfig:
    """The config.json of a format-1 checkpoint (zssvd 0.1 wrote it; the tests write one to check it loads)."""
    base_dict = base.to_dict()
    base_dict.pop("quantization_config", None)  # a GGUF source's leftovers; our weights are plain tensors
    config = ZSSVDConfig(base_config=base_dict, architectures=["ZSSVDForCausalLM"])
    config.auto_map = dict(AUTO_MAP)
    return config
