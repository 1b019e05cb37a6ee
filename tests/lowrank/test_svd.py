"""Low-rank approximations (lowbit.lowrank.svd): truncated SVD is Eckart-Young optimal, randomized SVD
matches it on low-rank-plus-noise, weighted SVD is optimal for its weighted objective."""

import pytest
import torch

from lowbit.lowrank.svd import (
    LowRankError,
    fisher_weights,
    hessian_svd_r,
    randomized_svd,
    svd_r,
    use_randomized,
    weighted_svd_r,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def low_rank_plus_noise(n: int, k: int, r: int, noise: float, seed: int = 0) -> torch.Tensor:
    g = gen(seed)
    low = torch.randn(n, r, generator=g) @ torch.randn(r, k, generator=g)
    return low + noise * torch.randn(n, k, generator=g)


def weighted_err(A, B, row_w, col_w) -> float:
    return float((row_w[:, None] * col_w[None, :] * (A - B).square()).sum())


@pytest.mark.parametrize("r", [1, 5, 32])
def test_svd_r_is_eckart_young_optimal_with_balanced_factors(r):
    A = torch.randn(64, 96, generator=gen())
    L1, L2 = svd_r(A, r, randomized=False)
    assert L1.shape == (64, r) and L2.shape == (r, 96)
    S = torch.linalg.svdvals(A.double())
    assert float((A - L1 @ L2).square().sum()) == pytest.approx(float(S[r:].square().sum()), rel=1e-4)
    # singular values split evenly: L1^T L1 = L2 L2^T = diag(S_r)
    torch.testing.assert_close(L1.T @ L1, L2 @ L2.T, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(torch.diag(L1.T @ L1), S[:r].float(), atol=1e-3, rtol=1e-4)


def test_rank_zero_and_bad_ranks():
    A = torch.randn(10, 20)
    L1, L2 = svd_r(A, 0)
    assert L1.shape == (10, 0) and L2.shape == (0, 20) and (L1 @ L2).abs().sum() == 0
    for bad in (-1, 11, 2.0, True):
        with pytest.raises(LowRankError):
            svd_r(A, bad)
    with pytest.raises(LowRankError):
        svd_r(torch.randn(3, 4, 5), 1)


def test_randomized_svd_close_to_exact_on_low_rank_plus_noise():
    A = low_rank_plus_noise(400, 300, 12, 0.01)
    exact = torch.linalg.svdvals(A.double())
    U, S, Vh = randomized_svd(A, 12)
    torch.testing.assert_close(S.double(), exact[:12], rtol=1e-3, atol=0)
    torch.testing.assert_close(U.T @ U, torch.eye(12), atol=1e-4, rtol=0)
    L1, L2 = svd_r(A, 12, randomized=True)
    E1, E2 = svd_r(A, 12, randomized=False)
    optimal = float(exact[12:].square().sum())
    assert float((A - L1 @ L2).square().sum()) <= 1.01 * optimal
    assert float((L1 @ L2 - E1 @ E2).norm() / (E1 @ E2).norm()) < 1e-3


def test_randomized_svd_is_deterministic():
    A = low_rank_plus_noise(200, 150, 5, 0.1)
    a, b = randomized_svd(A, 5), randomized_svd(A, 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_randomized_only_for_small_rank_of_large_matrices():
    assert use_randomized((4096, 11008), 64)
    assert use_randomized((1024, 1024), 128)
    assert not use_randomized((1024, 1024), 129)
    assert use_randomized((576, 1536), 72)
    assert not use_randomized((576, 1536), 73)
    assert not use_randomized((256, 1536), 8)


@pytest.mark.parametrize("r", [1, 4, 16])
def test_weighted_svd_is_optimal_for_its_objective(r):
    g = gen(3)
    A = torch.randn(48, 80, generator=g)
    row_w = torch.rand(48, generator=g) ** 4 * 100 + 0.01
    col_w = torch.rand(80, generator=g) ** 4 * 100 + 0.01
    L1, L2 = weighted_svd_r(A, r, row_w, col_w)
    ours = weighted_err(A, L1 @ L2, row_w, col_w)
    P1, P2 = svd_r(A, r)
    assert ours < 0.9 * weighted_err(A, P1 @ P2, row_w, col_w)
    # exact optimum: the tail singular values of the scaled matrix
    scaled = row_w.sqrt()[:, None] * A * col_w.sqrt()[None, :]
    tail = float(torch.linalg.svdvals(scaled.double())[r:].square().sum())
    assert ours == pytest.approx(tail, rel=1e-3)
    # no perturbation of the factors does better
    for _ in range(5):
        P1 = L1 + 1e-2 * torch.randn(L1.shape, generator=g)
        P2 = L2 + 1e-2 * torch.randn(L2.shape, generator=g)
        B = P1 @ P2
        assert weighted_err(A, B, row_w, col_w) >= ours


def test_uniform_weights_give_plain_svd():
    A = torch.randn(30, 40, generator=gen(4))
    L1, L2 = weighted_svd_r(A, 5, torch.full((30,), 2.0), torch.full((40,), 0.5))
    P1, P2 = svd_r(A, 5)
    torch.testing.assert_close(L1 @ L2, P1 @ P2, atol=1e-4, rtol=1e-4)


def test_zero_weights_stay_finite_and_bad_weights_raise():
    A = torch.randn(20, 30)
    row_w = torch.rand(20)
    row_w[3] = 0
    L1, L2 = weighted_svd_r(A, 4, row_w, torch.rand(30) + 0.1)
    assert torch.isfinite(L1).all() and torch.isfinite(L2).all()
    for bad in (-torch.ones(20), torch.zeros(20), torch.ones(19), torch.full((20,), float("nan"))):
        with pytest.raises(LowRankError):
            weighted_svd_r(A, 4, bad, torch.ones(30))


def test_fisher_weights_recover_a_rank_one_fisher_exactly():
    g = gen(5)
    a, b = torch.rand(16, generator=g) + 0.1, torch.rand(24, generator=g) + 0.1
    F = a[:, None] * b[None, :]
    row_w, col_w = fisher_weights(F)
    torch.testing.assert_close(row_w[:, None] * col_w[None, :], F)
    with pytest.raises(LowRankError):
        fisher_weights(-F)


def output_err(A, B, H) -> float:
    D = (A - B).double()
    return float(((D @ H.double()) * D).sum())


@pytest.mark.parametrize("r", [1, 6])
def test_hessian_svd_is_optimal_for_the_output_error(r):
    """With an outlier-heavy H = X^T X: beats the plain SVD, reaches the closed-form optimum (the tail
    singular values of A S), and no perturbation of its factors does better."""
    g = gen(5)
    X = torch.randn(200, 40, generator=g) * (torch.rand(40, generator=g) ** 3 * 20 + 0.1)
    H = X.T @ X
    A = torch.randn(24, 40, generator=g)
    L1, L2 = hessian_svd_r(A, r, H, damp=0.0)
    ours = output_err(A, L1 @ L2, H)
    P1, P2 = svd_r(A, r)
    assert ours < 0.9 * output_err(A, P1 @ P2, H)
    S = torch.linalg.cholesky(H.double())
    assert ours == pytest.approx(float(torch.linalg.svdvals(A.double() @ S)[r:].square().sum()), rel=1e-3)
    for _ in range(5):
        B = (L1 + 1e-2 * torch.randn(L1.shape, generator=g)) @ (
            L2 + 1e-2 * torch.randn(L2.shape, generator=g)
        )
        assert output_err(A, B, H) >= ours


def test_hessian_svd_with_identity_is_plain_svd_and_checks_h():
    A = torch.randn(30, 40, generator=gen(6))
    L1, L2 = hessian_svd_r(A, 5, 3.0 * torch.eye(40))
    P1, P2 = svd_r(A, 5)
    torch.testing.assert_close(L1 @ L2, P1 @ P2, atol=1e-4, rtol=1e-4)
    X = torch.randn(10, 40, generator=gen(7))  # rank-deficient H: the dampening keeps it solvable
    assert torch.isfinite(torch.cat([f.flatten() for f in hessian_svd_r(A, 5, X.T @ X)])).all()
    for bad in (torch.eye(39), torch.full((40, 40), float("nan")), -torch.eye(40)):
        with pytest.raises(LowRankError):
            hessian_svd_r(A, 5, bad)
