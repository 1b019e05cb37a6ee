"""LQ-LoRA (Guo et al. 2023, "LQ-LoRA: Low-rank plus Quantized Matrix Decomposition", Algorithm 1).

min over Q, L1, L2 of ||W - (Q + L1 L2)||_F, Q quantized, rank(L1 L2) <= r, by alternating

    L1 L2 <- SVD_r(W - Q),   Q <- quantize(W - L1 L2)

from Q = 0 as in the paper, stopping when the error rises or improves by less than a fraction `tol`
(at most `iterations` steps). The best iterate is kept, and LoRC's point (Q = quantize(W),
L1 L2 = SVD_r(W - Q)) competes with the iterates, so the result is never worse than LoRC's.
The alternating steps round to nearest; with GPTQ rounding, the chosen L1 L2 starts GPTQ_ROUNDS rounds of
Q <- GPTQ(W - L1 L2), L1 L2 <- the output-optimal rank-r fit of W - Q (`gptq_lowrank`, CALDERA's
alternation), so that the result minimises the output error GPTQ rounds for. The Fisher-weighted variant
keeps its weighted L1 L2 and only re-quantizes Q by GPTQ.

The data-aware variant (sec. 3.3) minimises the Fisher-weighted error ||sqrt(F) * (W - Q - L1 L2)||_F:
F [N, K] is approximated by a rank-1 outer product of row and column weights, which makes the L step an
exact weighted SVD; the Q step stays plain quantization of W - L1 L2, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.lowrank.decomposition import (
    GPTQ_ROUNDS,
    DecomposeError,
    DecomposeOptions,
    Decomposition,
    Stats,
    final_q,
    finish,
)
from lowbit.lowrank.error import fisher_error, frobenius_error
from lowbit.lowrank.svd import fisher_weights, svd_r, weighted_svd_r
from lowbit.quantizers import QuantSpec, dequantize, quantize

LowRank = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Objective = Callable[[torch.Tensor], float]


def alternate(
    W: torch.Tensor,
    spec: QuantSpec,
    stats: Stats,
    opts: DecomposeOptions,
    lowrank: LowRank,
    objective: Objective,
    method: str,
) -> Decomposition:
    """Algorithm 1 with early stopping and best-iterate tracking, for a given L step and objective.

    lowrank: A [N, K] -> (L1 [N, r], L2 [r, K]); objective: W_hat [N, K] -> error to minimise.
    """
    q = quantize(W, spec)
    L1, L2 = lowrank(W - dequantize(q))
    best = (objective(dequantize(q) + L1 @ L2), q, L1, L2, "lorc")
    Qd = torch.zeros_like(W)  # dequantized Q, Q(0) = 0
    prev = float("inf")
    for t in range(1, opts.iterations + 1):
        L1, L2 = lowrank(W - Qd)
        q = quantize(W - L1 @ L2, spec)
        Qd = dequantize(q)
        err = objective(Qd + L1 @ L2)
        if err < best[0]:
            best = (err, q, L1, L2, f"iteration {t}")
        if err >= prev * (1.0 - opts.tol):
            break
        prev = err
    _, q, L1, L2, source = best
    if opts.rounding != "nearest":
        rounds = GPTQ_ROUNDS if method == "lqlora" else 0  # lqlora-fisher keeps its weighted L1 L2
        q, L1, L2 = final_q(W, spec, L1, L2, stats.H, opts.rounding, rounds)
    return finish(W, q, L1, L2, stats, method=method, iterations=t, best=source)


def lqlora(
    W: torch.Tensor, spec: QuantSpec, rank: int, stats: Stats, opts: DecomposeOptions
) -> Decomposition:
    """W [N, K] ~ Q + L1 L2 minimising ||W - Q - L1 L2||_F by alternating SVD and quantization."""
    return alternate(
        W, spec, stats, opts, lambda A: svd_r(A, rank), lambda W_hat: frobenius_error(W, W_hat), "lqlora"
    )


def lqlora_fisher(
    W: torch.Tensor, spec: QuantSpec, rank: int, stats: Stats, opts: DecomposeOptions
) -> Decomposition:
    """W [N, K] ~ Q + L1 L2 minimising sum(F * (W - Q - L1 L2)^2), F = stats.fisher [N, K]."""
    if stats.fisher is None:
        raise DecomposeError("method 'lqlora-fisher' needs the Fisher diagonal (fisher=[N, K])")
    F = stats.fisher.float()
    row_w, col_w = fisher_weights(F)  # [N], [K]
    return alternate(
        W,
        spec,
        stats,
        opts,
        lambda A: weighted_svd_r(A, rank, row_w, col_w),
        lambda W_hat: fisher_error(W, W_hat, F),
        "lqlora-fisher",
    )
