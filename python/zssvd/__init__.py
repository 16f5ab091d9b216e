"""zssvd: Zero-Sum SVD compression of Hugging Face causal language models.

    import zssvd
    model, tokenizer, _ = zssvd.load_model("path/to/model")
    calib = zssvd.calibration.from_files(tokenizer, ["wiki.valid.txt"], num_samples=32, seq_len=512)
    model, report = zssvd.compress(model, calib, ratio=0.8)
    zssvd.save_compressed(model, "out", tokenizer=tokenizer, report=report)
    model = zssvd.load("out")
"""
__version__ = "0.1.0"

from . import calibration  # noqa: E402
from .checkpoint import CheckpointError, load, save_compressed  # noqa: E402
from .evaluate import perplexity  # noqa: E402
from .models import find_targets, load_model  # noqa: E402
from .pipeline import Analysis, AnalysisOptions, analyze, compress  # noqa: E402
from .hf import register as _register_with_transformers  # noqa: E402

_register_with_transformers()

__all__ = ["Analysis", "AnalysisOptions", "CheckpointError", "analyze", "calibration", "compress", "find_targets",
           "load", "load_model", "perplexity", "save_compressed"]
