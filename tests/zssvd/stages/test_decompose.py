"""Whitened SVD: the Gram route agrees with torch's SVD and reconstructs W exactly."""
import pytest
import torch

from zssvd.stages.decompose import whitened_svd
from zssvd.stages.whitening import whitening_factor


@pytest.mark.parametrize("m, n", [(13, 7), (7, 13), (9, 9)])
def test_gram_and_svd_agree_and_reconstruct(m, n, rng):
    W = torch.randn(m, n, generator=rng, dtype=torch.float64)
    X = torch.randn(50, n, generator=rng, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)
    S = whitening_factor(X.T @ X / 50).factor
    gram = whitened_svd(W, S, method="gram", out_dtype=torch.float64)
    svd = whitened_svd(W, S, method="svd", out_dtype=torch.float64)
    torch.testing.assert_close(gram.sigma, svd.sigma, rtol=1e-9, atol=1e-12)
    assert (gram.sigma[:-1] >= gram.sigma[1:]).all()
    # W = U diag(sigma) Z^T with Z = S^{-T} V, for both routes.
    torch.testing.assert_close(gram.reconstruct(), W, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(svd.reconstruct(), W, rtol=1e-9, atol=1e-10)
    # Each component's outer product is route-independent (signs cancel).
    for i in range(gram.rank):
        a = torch.outer(gram.U[:, i], gram.Z[:, i])
        b = torch.outer(svd.U[:, i], svd.Z[:, i])
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_truncation_is_optimal_in_activation_space(rng):
    """Rank-k truncation of W S beats a random rank-k alternative in ||(W - W') X||."""
    m, n, k = 10, 8, 3
    W = torch.randn(m, n, generator=rng, dtype=torch.float64)
    X = torch.randn(80, n, generator=rng, dtype=torch.float64) * torch.linspace(0.1, 4, n, dtype=torch.float64)
    S = whitening_factor(X.T @ X).factor
    f = whitened_svd(W, S, out_dtype=torch.float64)
    best = ((W - f.reconstruct(slice(0, k))) @ X.T).norm()
    plain = torch.linalg.svd(W)  # unwhitened truncation is worse
    W_plain = plain.U[:, :k] @ torch.diag(plain.S[:k]) @ plain.Vh[:k]
    assert best < ((W - W_plain) @ X.T).norm()
    U, V = f.balanced_factors(slice(0, k))
    torch.testing.assert_close(U @ V.T, f.reconstruct(slice(0, k)))
