"""Large M (prefill): dequantize once into a reused scratch, then one dense matmul.

Above a crossover row count the layer is compute-bound, and a dense GEMM on tensor cores beats any
kernel that dequantizes inside its K loop (which re-dequantizes the weight once per M tile, on the
warps that issue the MMAs). So the weight, its low-rank part and the smoothing are folded into one
dense matrix in the activation dtype,

    W' [N, K] = (dequantize(Q) + L1 @ L2) * (1 / smooth)[None, :],    y = x @ W'.T + bias

by one Triton launch (`_fold_kernel`, any stored format: `triton_common.load_weight_tile`), then one
`torch.addmm` / `torch.matmul` (cuBLAS). W' lives in a scratch buffer shared by the layers of a device
and dtype (grown to the largest layer, never shrunk), so no per-layer dense copy is kept.

The default is one launch at every M (the issue's target): this path runs only from a MEASURED
crossover, `CROSSOVER_M[format]`, set from `scripts/gpu_check.py`'s timing of both sides on a GPU.
No GPU has measured one yet, so the table is empty and no format takes this path by default. The
prediction the first measurement tests (not a measurement): about 1,000 rows for 4-bit weights and
500 for the others on an H100 (at 0.53 bytes per int4 weight the fold costs about as long as reading
and writing 2.5 bytes per weight, under 10% of a bf16 GEMM from about 1,000 rows, while the split-K
kernels re-dequantize the weight once per 64-row tile on the warps that issue the MMAs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton_common import (
    add_rank_product,
    dot_precision,
    format_constexprs,
    load_weight_tile,
    weight_args,
)
from lowbit.quantizers import QTensor

# first M served by dequantize + matmul, per stored format: MEASURED values only (none yet)
CROSSOVER_M: dict[str, int] = {}
BLOCK_N, BLOCK_K, BLOCK_R = 64, 64, 16


def crossover(q: QTensor) -> int | None:
    """The first row count the dequantize + matmul path serves for q's format; None: no measured one
    (every M runs one launch)."""
    return CROSSOVER_M.get(q.spec.format)


@triton.jit
def _fold_kernel(
    codes_ptr, scales_ptr, zeros_ptr, dq_absmax_ptr, lut_ptr, l1_ptr, l2_ptr, inv_smooth_ptr, w_ptr,
    N, K, G, R, stride_cn, stride_l1n, stride_l2r,
    FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    PER_CHANNEL: tl.constexpr, GROUP_SIZE: tl.constexpr, DQ_BLOCK: tl.constexpr, DQ_LEVELS: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_LOWRANK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """W'[n tile, k tile] = (dequantize(Q) + L1 @ L2) * inv_smooth, in the dtype of w_ptr."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    w = load_weight_tile(
        codes_ptr, scales_ptr, zeros_ptr, dq_absmax_ptr, lut_ptr, offs_n, pid_k * BLOCK_K, N, K, G, stride_cn,
        FMT, BITS, HAS_ZEROS, DOUBLE_QUANT, PER_CHANNEL, GROUP_SIZE, DQ_BLOCK, DQ_LEVELS, BLOCK_K,
    )  # fmt: skip  # fp32 [BLOCK_N, BLOCK_K]
    if HAS_LOWRANK:  # + l1[offs_n] @ l2[:, offs_k]
        w = add_rank_product(w, l1_ptr, l2_ptr, offs_n, offs_k, N, K, R, stride_l1n, 1, 1, stride_l2r,
                             BLOCK_N, BLOCK_R, DOT_PRECISION)  # fmt: skip
    if HAS_SMOOTH:
        w = w * tl.load(inv_smooth_ptr + offs_k, mask=offs_k < K, other=0.0)[None, :]
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(w_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


# (device, dtype) -> flat dense scratch, grown to the largest layer
_SCRATCH: dict[tuple, torch.Tensor] = {}


def fold(q: QTensor, l1, l2, inv_smooth, dtype: torch.dtype) -> torch.Tensor:
    """W' [N, K] in `dtype` (a view of the shared scratch, valid until the next fold on the device)."""
    N, K = q.shape
    device = q.codes.device
    buf = _SCRATCH.get((device, dtype))
    if buf is None or buf.numel() < N * K:
        buf = _SCRATCH[(device, dtype)] = torch.empty(N * K, dtype=dtype, device=device)
    w = buf[: N * K].view(N, K)
    codes, scales, zeros, dq_absmax, lut = weight_args(q, device)
    R = 0 if l1 is None else l1.shape[1]
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K))
    _fold_kernel[grid](
        codes, scales, zeros, dq_absmax, lut, l1, l2, inv_smooth, w,
        N, K, scales.shape[1], R, codes.stride(0), 0 if l1 is None else l1.stride(0),
        0 if l2 is None else l2.stride(0),
        **format_constexprs(q), HAS_SMOOTH=inv_smooth is not None, HAS_LOWRANK=R > 0,
        DOT_PRECISION=dot_precision(dtype), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
    )  # fmt: skip
    return w


def large(x: torch.Tensor, q: QTensor, l1, l2, inv_smooth, bias) -> torch.Tensor:
    """y [M, N] = x @ fold(...).T + bias: two launches (the fold, one cuBLAS GEMM) whatever the rank.

    x [M, K]; l1 [N, r], l2 [r, K] in x's dtype; inv_smooth float32 [K]; checked at preparation time.
    """
    w = fold(q, l1, l2, inv_smooth, x.dtype)
    return torch.matmul(x, w.T) if bias is None else torch.addmm(bias, x, w.T)
