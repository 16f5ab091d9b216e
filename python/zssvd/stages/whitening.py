"""Stage 2 (whiten) -- a lower-triangular S with S S^T = C + lambda I.

With such an S, ||(W - W') X||_F^2 = tokens * ||(W - W') S||_F^2 (up to the ridge term
lambda * ||W - W'||_F^2), so the best rank-k approximation of W in activation space is the
truncated SVD of A = W S mapped back through S^{-1}.

lambda starts tiny and relative to the covariance's scale (trace / n) and grows tenfold on
each Cholesky failure; this also gives a valid, triangular factor when C is rank-deficient
(fewer calibration tokens than input features, dead features). The factor is always
triangular, so triangular solves with it are correct -- never an explicit inverse.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class CovarianceError(ValueError):
    """A covariance that cannot be whitened (non-finite, zero, or not PSD beyond repair)."""


@dataclass
class Whitening:
    factor: torch.Tensor  # S, lower triangular, float64 (n x n)
    jitter: float  # lambda actually added to the diagonal (absolute)
    relative_jitter: float  # lambda / (trace(C) / n)


def whitening_factor(cov: torch.Tensor, name: str = "covariance", *, base_jitter: float = 1e-6,
                     max_jitter: float = 1e-1) -> Whitening:
    """Cholesky factor of ``cov + lambda I`` with trace-scaled, escalating ``lambda``."""
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise CovarianceError(f"{name}: covariance must be square, got shape {tuple(cov.shape)}")
    cov = cov.to(torch.float64)
    if not torch.isfinite(cov).all():
        raise CovarianceError(f"{name}: covariance contains NaN/Inf; the activations overflowed "
                              "(load the model in float32) or the weights are corrupt")
    n = cov.shape[0]
    scale = torch.diagonal(cov).sum().item() / n
    if scale <= 0:
        raise CovarianceError(f"{name}: covariance is zero (the layer only ever saw zero input); "
                              "use more or different calibration text")
    symmetric = (cov + cov.T).mul_(0.5)  # exact symmetry; accumulation order can break it by an ulp
    relative = base_jitter
    while relative <= max_jitter * (1 + 1e-9):
        shifted = symmetric.clone()  # the shift goes on the diagonal in place: no n x n identity
        shifted.diagonal().add_(relative * scale)
        factor, info = torch.linalg.cholesky_ex(shifted)
        del shifted
        if int(info) == 0 and torch.isfinite(factor).all():
            return Whitening(factor=factor, jitter=relative * scale, relative_jitter=relative)
        relative *= 10.0
    raise CovarianceError(
        f"{name}: covariance is not positive definite even with a diagonal shift of {max_jitter:g} x "
        "trace/n; its eigenvalues are strongly negative, which a true covariance cannot have: "
        "check the activations for corruption"
    )


def solve_right_transpose(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Z = S^{-T} R for lower-triangular S, by a triangular solve (never an inverse)."""
    return torch.linalg.solve_triangular(factor.mT, rhs, upper=True)
