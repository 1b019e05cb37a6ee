"""Randomized Hadamard matrices, the orthogonal rotations of QuaRot (Ashkboos et al. 2024, "QuaRot:
Outlier-Free 4-Bit Inference in Rotated LLMs", sec. 3-4; Chee et al. 2023, QuIP's incoherence processing).

A Hadamard matrix H_n [n, n] has entries +-1 and H_n H_n^T = n I. Built here as Kronecker products of
Sylvester's H_2 = [[1, 1], [1, -1]] and Paley's construction I for an order p + 1 with p a prime, p = 3
(mod 4): H = I + S, S = [[0, 1^T], [-1, J]], J_ij = chi(j - i) the quadratic residue character mod p (J is
skew-symmetric because -1 is a non-residue). The product of Hadamard matrices is one (H_a (x) H_b). Orders
like 576 = 12 * 12 * 4 are covered; an order with no such factorisation is refused.

The randomized rotation is R = diag(d) H_n / sqrt(n) with d a seeded random +-1 vector (QuaRot sec. 3; QuIP
sec. 4): a row vector x becomes x R = (x * d) H_n / sqrt(n), its signs drawn before the Hadamard mixes its
entries, so which entries add and which cancel depends on the draw and the rotation is incoherent with any
fixed weight or activation (with the signs applied after the mixing, |x R| would be the same for every
draw); R R^T = I.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from lowbit.quantizers.spec import QuantInputError


def sylvester(n: int) -> torch.Tensor:
    """H_n for n a power of 2 (float64 +-1)."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def _is_prime(p: int) -> bool:
    return p > 1 and all(p % d for d in range(2, int(p**0.5) + 1))


def paley(p: int) -> torch.Tensor:
    """Paley's H_{p+1} for a prime p = 3 (mod 4) (float64 +-1)."""
    residues = {(i * i) % p for i in range(1, p)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, p)], dtype=torch.float64)
    idx = torch.arange(p)
    J = chi[(idx[None, :] - idx[:, None]) % p]  # J_ij = chi(j - i), skew-symmetric
    S = torch.zeros(p + 1, p + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, J
    return torch.eye(p + 1, dtype=torch.float64) + S


@lru_cache(maxsize=32)
def _factors(n: int) -> tuple[int, ...] | None:
    """Orders (powers of 2 or p + 1, p prime = 3 mod 4) whose product is n, or None."""
    if n & (n - 1) == 0:
        return (n,)
    for d in range(4, n + 1, 4):
        if n % d == 0 and _is_prime(d - 1) and (d - 1) % 4 == 3:
            rest = _factors(n // d)
            if rest is not None:
                return (d, *rest)
    return None


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix H_n [n, n] (float64 +-1, H H^T = n I); QuantInputError when none is built here."""
    parts = _factors(n) if n >= 1 else None
    if parts is None:
        raise QuantInputError(f"no Hadamard matrix of order {n} is built here (needs 2^a * prod (p + 1))")
    H = torch.ones(1, 1, dtype=torch.float64)
    for d in parts:
        H = torch.kron(H, sylvester(d) if d & (d - 1) == 0 else paley(d - 1))
    return H


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthogonal rotation R = diag(d) H_n / sqrt(n) [n, n], d random +-1 from `seed` (R R^T = I)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return (d[:, None] * hadamard(n) / n**0.5).to(dtype)


def online_orders(n: int) -> tuple[int, int]:
    """(m, p) with n = m * p, p the largest power of two leaving an m of which a Hadamard matrix is built
    here: the online transform is a fast Walsh-Hadamard transform of order p times a dense H_m."""
    p = n & -n if n >= 1 else 0  # the largest power of two dividing n
    while p >= 1:
        if _factors(n // p) is not None:
            return n // p, p
        p //= 2
    raise QuantInputError(f"no Hadamard matrix of order {n} is built here (needs 2^a * prod (p + 1))")


def online_matrix(n: int) -> torch.Tensor:
    """The online rotation R = (H_m (x) H_p) / sqrt(n) [n, n] (float64, R R^T = I), (m, p) = online_orders(n):
    the matrix `lowbit.kernels.reference.hadamard_transform` multiplies by."""
    m, p = online_orders(n)
    return torch.kron(hadamard(m), sylvester(p)) / n**0.5
