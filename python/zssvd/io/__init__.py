"""Models in and out: loading sources (``models``), zssvd checkpoints (``checkpoint``) and the
Hugging Face integration (``hf_config``, ``hf``)."""
