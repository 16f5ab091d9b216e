"""Stage 3 (decompose) -- whitened SVD of every target: W S = U diag(sigma) V^T.

Kept per matrix: U (m x r), sigma (r, descending) and Z = S^{-T} V (n x r), r = min(m, n).
Z is all the rest of the pipeline needs: W = U diag(sigma) Z^T, the truncated weight is
U_k diag(sigma_k) Z_k^T, the output factors are U_k sqrt(sigma_k) and Z_k sqrt(sigma_k), and
the score of component i is -sigma_i u_i^T G z_i (= -sigma_i u_i^T (G S^{-T}) v_i).

The default method takes the float64 eigendecomposition of the smaller Gram matrix (A^T A or
A A^T), much faster than a full SVD on a GPU and accurate in float64 for every component the
selection could keep; ``method="svd"`` uses ``torch.linalg.svd`` instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime.progress import progress
from .whitening import solve_right_transpose


@dataclass
class Factors:
    U: torch.Tensor  # m x r
    sigma: torch.Tensor  # r, descending, non-negative
    Z: torch.Tensor  # n x r, S^{-T} V

    @property
    def rank(self) -> int:
        return self.sigma.numel()

    def _kept(self, keep):
        if keep is None:
            return self.U, self.sigma, self.Z
        return self.U[:, keep], self.sigma[keep], self.Z[:, keep]

    def reconstruct(self, keep=None) -> torch.Tensor:
        """U_k diag(sigma_k) Z_k^T for the kept components (an index tensor, slice or None = all)."""
        U, sigma, Z = self._kept(keep)
        return (U * sigma) @ Z.T

    def balanced_factors(self, keep=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_k sqrt(sigma_k), Z_k sqrt(sigma_k)) so that W' = first @ second^T; balanced for quantisers."""
        U, sigma, Z = self._kept(keep)
        root = sigma.sqrt()
        return U * root, Z * root

    def to(self, **kwargs) -> "Factors":
        return Factors(self.U.to(**kwargs), self.sigma.to(**kwargs), self.Z.to(**kwargs))


def whitened_svd(weight: torch.Tensor, factor: torch.Tensor, *, method: str = "gram",
                 out_dtype: torch.dtype = torch.float32) -> Factors:
    """SVD of A = W S in float64, returned as (U, sigma, Z = S^{-T} V) in ``out_dtype``."""
    A = weight.to(torch.float64) @ factor.to(device=weight.device, dtype=torch.float64)
    if method == "gram":
        U, sigma, V = _svd_by_gram(A)
    elif method == "svd":
        U, sigma, Vh = torch.linalg.svd(A, full_matrices=False)
        V = Vh.mT
    else:
        raise ValueError(f"method must be 'gram' or 'svd', got {method!r}")
    Z = solve_right_transpose(factor.to(A), V)
    return Factors(U.to(out_dtype), sigma.to(out_dtype), Z.to(out_dtype))


def _svd_by_gram(A: torch.Tensor):
    """Thin SVD from the eigendecomposition of the smaller Gram matrix (float64)."""
    m, n = A.shape
    tall = m >= n
    gram = A.T @ A if tall else A @ A.T
    evals, vecs = torch.linalg.eigh(gram)  # ascending
    evals, vecs = evals.flip(0), vecs.flip(1)
    sigma = evals.clamp_min(0).sqrt()
    # Components at round-off level have no meaningful partner vector: give them a zero one,
    # so they contribute nothing to W' and score exactly zero.
    tiny = sigma <= sigma[0] * max(m, n) * torch.finfo(torch.float64).eps
    other = (A @ vecs if tall else A.T @ vecs) / torch.where(tiny, 1.0, sigma)
    other[:, tiny] = 0.0
    return (other, sigma, vecs) if tall else (vecs, sigma, other)


def decompose_all(weights: dict[str, torch.Tensor], factor_of: dict[str, torch.Tensor], *, method: str = "gram",
                  out_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                  out_device: torch.device | str | None = None) -> dict[str, Factors]:
    """Whitened SVD of every named weight, with its whitening factor ``factor_of[name]``.

    ``device``, if given, is where each matrix is decomposed (one at a time, e.g. a GPU for a model
    kept in CPU memory); the factors are returned on ``out_device``, by default that of their weight.
    """
    factors = {}
    moved: tuple = (None, None)  # (source, copy on the compute device): q/k/v, gate/up share one factor
    for name, w in progress(weights.items(), desc="whitened SVD", unit="matrix", total=len(weights)):
        on = w.device if device is None else torch.device(device)
        if moved[0] is not factor_of[name] or moved[1].device != on:
            moved = (factor_of[name], factor_of[name].to(on))
        f = whitened_svd(w.to(on), moved[1], method=method, out_dtype=out_dtype)
        factors[name] = f.to(device=out_device or w.device)
    return factors
