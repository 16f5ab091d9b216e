"""Where checkpoints written by zssvd 0.1 find their remote code (``from zssvd.hf import ...``)."""
from .io.hf import ZSSVDForCausalLM  # noqa: F401
from .io.hf_config import ZSSVDConfig  # noqa: F401
