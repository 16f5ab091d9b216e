"""sigma_scores: s_i = u_i^T H v_i for every component (``kernels``: Triton; ``naive``: torch)."""
from .kernels import sigma_scores, sigma_scores_batched
from .naive import sigma_scores_reference

__all__ = ["sigma_scores", "sigma_scores_batched", "sigma_scores_reference"]
