"""Truncated, randomized and weighted low-rank approximations A ~ L1 L2.

- svd_r: the best rank-r approximation in Frobenius norm (Eckart-Young), singular values split evenly
  between the factors, L1 = U_r sqrt(S_r), L2 = sqrt(S_r) V_r^T, so neither factor dominates in scale.
- randomized_svd: Halko, Martinsson & Tropp 2011, "Finding structure with randomness", Algorithm 4.4
  (randomized range finder with q power iterations, each re-orthonormalised) followed by Algorithm 5.1
  (direct SVD of the small projected matrix). Used when r is much smaller than the matrix.
- weighted_svd_r: min ||diag(sqrt(row_w)) (A - L1 L2) diag(sqrt(col_w))||_F, solved exactly by the SVD of
  the scaled matrix (the rank-1 Fisher approximation of LQ-LoRA, Guo et al. 2023, sec. 3.3).
- hessian_svd_r: min tr((A - L1 L2) H (A - L1 L2)^T), the output error of a layer whose inputs have
  Hessian H = X^T X, solved exactly through the Cholesky factor of H (reduced-rank regression; the
  low-rank update of CALDERA, Saha et al. 2024, sec. 3).
"""

from __future__ import annotations

import torch

# Randomized SVD pays off when the rank is a small fraction of a large matrix.
RANDOMIZED_MIN_DIM = 512
RANDOMIZED_MAX_FRACTION = 8
OVERSAMPLE = 10
POWER_ITERS = 4


class LowRankError(ValueError):
    """A low-rank approximation that cannot be computed as asked (bad rank, bad weights, ...)."""


def _check(A: torch.Tensor, r: int) -> None:
    if A.dim() != 2:
        raise LowRankError(f"expected a matrix, got a tensor of shape {tuple(A.shape)}")
    if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r <= min(A.shape):
        raise LowRankError(
            f"rank must be an integer in [0, {min(A.shape)}] for a {tuple(A.shape)} matrix, got {r!r}"
        )


def use_randomized(shape: tuple[int, int], r: int) -> bool:
    """True when r <= min(N, K) / 8 and min(N, K) >= 512: then randomized SVD is used by default."""
    m = min(shape)
    return m >= RANDOMIZED_MIN_DIM and r * RANDOMIZED_MAX_FRACTION <= m


def randomized_svd(
    A: torch.Tensor, r: int, *, oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-r SVD of A [N, K]: (U [N, r], S [r], Vh [r, K]), Halko et al. 2011 Alg. 4.4 + 5.1.

    Deterministic for a given seed. The power iterations make the error decay like (s_{r+p+1}/s_r)^(2q+1),
    so a few suffice for the slowly decaying spectra of weight matrices.
    """
    _check(A, r)
    A = A.float()
    N, K = A.shape
    ell = min(r + oversample, N, K)
    gen = torch.Generator(device=A.device).manual_seed(seed)
    Omega = torch.randn(K, ell, generator=gen, device=A.device)  # [K, ell]
    Y, _ = torch.linalg.qr(A @ Omega)  # [N, ell]
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(A.T @ Y)  # [K, ell]
        Y, _ = torch.linalg.qr(A @ Z)  # [N, ell]
    B = Y.T @ A  # [ell, K]
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return (Y @ Ub)[:, :r], S[:r], Vh[:r]


def svd_r(A: torch.Tensor, r: int, *, randomized: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r approximation A [N, K] ~ L1 [N, r] @ L2 [r, K], singular values split as sqrt between factors.

    randomized: None picks randomized SVD when `use_randomized(A.shape, r)`, full torch.linalg.svd
    otherwise. r = 0 gives empty factors [N, 0] and [0, K].
    """
    _check(A, r)
    A = A.float()
    N, K = A.shape
    if r == 0:
        return A.new_zeros(N, 0), A.new_zeros(0, K)
    if randomized is None:
        randomized = use_randomized((N, K), r)
    if randomized:
        U, S, Vh = randomized_svd(A, r)
    else:
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    root = S.sqrt()  # [r]
    return U * root[None, :], root[:, None] * Vh


def _sqrt_weights(w: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if w.shape != (n,):
        raise LowRankError(f"{name} must have shape [{n}], got {tuple(w.shape)}")
    w = w.float()
    if not torch.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
        raise LowRankError(f"{name} must be finite, non-negative and not all zero")
    d = w.sqrt()
    # a zero weight leaves that row/column free; a tiny floor keeps the unscaling finite
    return d.clamp_min(float(d.max()) * 1e-6)


def weighted_svd_r(
    A: torch.Tensor, r: int, row_w: torch.Tensor, col_w: torch.Tensor, *, randomized: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over rank-r L1 L2 of ||diag(sqrt(row_w)) (A - L1 L2) diag(sqrt(col_w))||_F, exactly.

    With D_r = diag(sqrt(row_w)) and D_c = diag(sqrt(col_w)) the objective is ||D_r A D_c - M||_F with
    M = D_r L1 L2 D_c of rank r, so M = SVD_r(D_r A D_c) and L1 = D_r^-1 M1, L2 = M2 D_c^-1.
    A [N, K], row_w [N], col_w [K] -> (L1 [N, r], L2 [r, K]).
    """
    _check(A, r)
    dr = _sqrt_weights(row_w, A.shape[0], "row weights")  # [N]
    dc = _sqrt_weights(col_w, A.shape[1], "column weights")  # [K]
    M1, M2 = svd_r(dr[:, None] * A.float() * dc[None, :], r, randomized=randomized)
    return M1 / dr[:, None], M2 / dc[None, :]


def hessian_svd_r(
    A: torch.Tensor, r: int, H: torch.Tensor, *, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over rank-r L1 L2 of tr((A - L1 L2) H_d (A - L1 L2)^T), exactly, H_d = H + damp mean(diag H) I.

    With H_d = S S^T (S lower Cholesky) the objective is ||A S - L1 L2 S||_F^2, and L1 L2 S ranges over all
    rank-r matrices, so L1 L2 S = SVD_r(A S): L1 = M1, L2 = M2 S^-1. The dampening makes H_d positive
    definite (input directions the data never excites get a small Frobenius weight instead of none).
    A [N, K], H [K, K] -> (L1 [N, r], L2 [r, K]).
    """
    _check(A, r)
    K = A.shape[1]
    if H.shape != (K, K):
        raise LowRankError(f"H must be [{K}, {K}] for A [N, {K}], got {tuple(H.shape)}")
    H = H.float()
    if not torch.isfinite(H).all():
        raise LowRankError("H contains NaN/Inf")
    Hd = H + damp * float(H.diagonal().mean().clamp_min(1e-12)) * torch.eye(K, device=H.device)
    S, info = torch.linalg.cholesky_ex(Hd)  # [K, K] lower
    if int(info):
        raise LowRankError("H is not positive semi-definite (its Cholesky factorisation failed)")
    M1, M2 = svd_r(A.float() @ S, r)  # [N, r], [r, K]
    return M1, torch.linalg.solve_triangular(S.T, M2.T, upper=True).T


def fisher_weights(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column weights (row_w [N], col_w [K]) with F [N, K] ~ row_w col_w^T (LQ-LoRA sec. 3.3).

    row_w = mean of F over columns, col_w = mean over rows divided by the mean of F: exact when F is
    itself rank-1 (F = a b^T gives row_w col_w^T = a b^T), the "homogeneous rows and columns" assumption.
    """
    if F.dim() != 2:
        raise LowRankError(f"the Fisher must be a matrix [N, K], got shape {tuple(F.shape)}")
    F = F.float()
    if not torch.isfinite(F).all() or (F < 0).any() or not (F > 0).any():
        raise LowRankError("the Fisher must be finite, non-negative and not all zero")
    return F.mean(1), F.mean(0) / F.mean()
