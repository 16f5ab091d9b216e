"""Whitening: S S^T = C + lambda I, the activation-space identity, and clear errors."""
import pytest
import torch

from zssvd.stages.whitening import CovarianceError, solve_right_transpose, whitening_factor


def _activations(tokens, features, rng):
    mix = torch.randn(features, features, generator=rng, dtype=torch.float64)
    return torch.randn(tokens, features, generator=rng, dtype=torch.float64) @ mix


def test_factor_is_lower_triangular_cholesky_of_shifted_covariance(rng):
    X = _activations(200, 12, rng)
    C = X.T @ X / 200
    w = whitening_factor(C)
    S = w.factor
    assert torch.equal(S, torch.tril(S))
    torch.testing.assert_close(S @ S.T, C + w.jitter * torch.eye(12, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    assert w.relative_jitter == pytest.approx(1e-6)


def test_whitening_identity_activation_error_equals_whitened_error(rng):
    """||(W - W') X^T||_F^2 / T == ||(W - W') S||_F^2 - lambda ||W - W'||_F^2 (exact with the ridge term)."""
    T, n, m = 300, 10, 7
    X = _activations(T, n, rng)
    C = X.T @ X / T
    w = whitening_factor(C)
    delta = torch.randn(m, n, generator=rng, dtype=torch.float64)
    activation_error = (delta @ X.T).pow(2).sum() / T
    whitened_error = (delta @ w.factor).pow(2).sum() - w.jitter * delta.pow(2).sum()
    torch.testing.assert_close(activation_error, whitened_error, rtol=1e-9, atol=0)


def test_rank_deficient_covariance_gets_a_valid_triangular_factor(rng):
    X = _activations(5, 16, rng)  # 5 tokens, 16 features: rank 5
    C = X.T @ X / 5
    w = whitening_factor(C)
    S = w.factor
    assert torch.isfinite(S).all() and torch.equal(S, torch.tril(S))
    torch.testing.assert_close(S @ S.T, C + w.jitter * torch.eye(16, dtype=torch.float64), rtol=1e-8, atol=1e-10)
    # Triangular solves with it are exact: S^{-T} (S^T R) = R.
    R = torch.randn(16, 3, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(solve_right_transpose(S, S.T @ R), R)


def test_jitter_escalates_for_indefinite_but_repairable_covariance(rng):
    X = _activations(100, 8, rng)
    C = X.T @ X / 100
    smallest = torch.linalg.eigvalsh(C)[0]
    scale = torch.diagonal(C).mean()
    C = C - (smallest + 1e-4 * scale) * torch.eye(8, dtype=torch.float64)  # one eigenvalue slightly negative
    w = whitening_factor(C)
    assert w.relative_jitter > 1e-4


@pytest.mark.parametrize("bad, message", [
    (torch.diag(torch.tensor([100.0, -50.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)), "not positive definite"),
    (torch.zeros(6, 6, dtype=torch.float64), "covariance is zero"),
    (torch.full((6, 6), float("nan"), dtype=torch.float64), "NaN"),
    (torch.ones(6, 5, dtype=torch.float64), "square"),
])
def test_bad_covariances_raise_clear_errors(bad, message):
    with pytest.raises(CovarianceError, match=message):
        whitening_factor(bad, "layer.x")
