"""LoRC, low-rank compensation (Yao et al. 2023, "ZeroQuant-V2", sec. 5): quantize first, then the best
rank-r approximation of the quantization error.

    Q = quantize(W),   L1 L2 = SVD_r(W - Q)

L1 L2 minimises ||W - Q - L1 L2||_F for this Q (Eckart-Young), so the error never exceeds plain
quantization's and falls with the rank. With GPTQ rounding, Q = GPTQ(W) and L1 L2 minimises the output
error tr((W - Q - L1 L2) H (...)^T) for this Q instead (`hessian_svd_r`), the objective GPTQ rounds for.
"""

from __future__ import annotations

import torch

from lowbit.lowrank.decomposition import DecomposeOptions, Decomposition, Stats, final_q, finish, uses_gptq
from lowbit.lowrank.svd import svd_r
from lowbit.quantizers import QuantSpec, dequantize


def lorc(W: torch.Tensor, spec: QuantSpec, rank: int, stats: Stats, opts: DecomposeOptions) -> Decomposition:
    """W [N, K] ~ Q + L1 L2 with Q = quantize(W) and L1 L2 = SVD_r(W - Q), or Q = GPTQ(W) and the
    output-optimal L1 L2."""
    L1, L2 = W.new_zeros(W.shape[0], rank), W.new_zeros(rank, W.shape[1])
    q, L1, L2 = final_q(W, spec, L1, L2, stats.H, opts.rounding)  # Q of W; GPTQ: with the refit of L1 L2
    if not uses_gptq(opts.rounding):
        L1, L2 = svd_r(W - dequantize(q), rank)  # [N, r], [r, K]
    return finish(W, q, L1, L2, stats, method="lorc")
