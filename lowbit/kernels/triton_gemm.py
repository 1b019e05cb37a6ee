"""Triton GEMM for the quantized linear at M > 16 rows (prefill, batched decode).

`qgemm` computes the reference's function (`lowbit.kernels.reference`)

    y [M, N] = x_s @ dequantize(Q).T + t @ l1.T + bias,   t = x_s @ l2.T,   x_s = x / smooth,

(the caller smooths x once) with one kernel in the layout of the Triton matmul tutorial: each program
owns a BLOCK_M x BLOCK_N tile of y; its K loop loads packed codes and their group scales, dequantizes
them in registers and accumulates x_s @ W.T in fp32 with tl.dot (`triton_common.dequant_dot_range`).
The low-rank down-projection t [M, r] is computed once beforehand (a small matmul); the epilogue adds
t @ l1.T while the accumulator is still in registers, then the bias, and casts to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton_common import (
    dequant_dot_range,
    gemm_launch,
    interpreting,
    store_output,
    tile_ids,
)
from lowbit.quantizers import QTensor


def tile_config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    """A matmul tile configuration: BLOCK_M x BLOCK_N output tiles, BLOCK_K columns a K step."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


GEMM_CONFIGS = [
    tile_config(16, 64, 64, 4, 4),
    tile_config(16, 64, 128, 4, 4),
    tile_config(32, 64, 64, 4, 4),
    tile_config(32, 64, 128, 4, 4),
    tile_config(32, 128, 64, 4, 4),
    tile_config(64, 64, 64, 4, 4),
    tile_config(64, 128, 64, 4, 4),
    tile_config(64, 128, 128, 8, 3),
    tile_config(128, 64, 64, 4, 4),
    tile_config(128, 128, 64, 8, 3),
    tile_config(128, 256, 64, 8, 3),
]
# The one configuration the CPU interpreter runs (its cost is per program and per operation, not per
# element); BLOCK_K = 64 exercises both scale paths (group sizes 64, 128: whole tiles; 32, 48: not).
INTERPRETER_GEMM_CONFIG = tile_config(32, 64, 64, 4, 1)


def fit_tiles(configs: list, args: dict) -> list:
    """The configurations whose tiles are no larger than the problem (M, N, K rounded up to tl.dot's 16)
    and, for many rows, not much smaller; of those the ones whose K tile lies in one scale group (one
    scale per row and tile instead of one per element), when any does."""
    size = {d: max(16, triton.next_power_of_2(args[d])) for d in "MNK"}
    kept = [c for c in configs if all(c.kwargs[f"BLOCK_{d}"] <= size[d] for d in "MNK")]
    # many rows: small row tiles only re-read the weight more often
    kept = [c for c in kept if c.kwargs["BLOCK_M"] >= min(64, size["M"] // 4)] or kept
    if args["PER_CHANNEL"]:
        return kept
    return [c for c in kept if args["GROUP_SIZE"] % c.kwargs["BLOCK_K"] == 0] or kept


def prune_gemm_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Autotuning pruner: `fit_tiles`, or the one interpreter configuration."""
    return [INTERPRETER_GEMM_CONFIG] if interpreting() else fit_tiles(configs, {**named_args, **kwargs})


_TUNE_KEY = ["M_BUCKET", "N", "K", "FMT", "BITS", "GROUP_SIZE", "HAS_LOWRANK"]


# cache_results: the best configuration is also kept in Triton's on-disk cache, keyed by the GPU target
@triton.autotune(
    configs=GEMM_CONFIGS,
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": prune_gemm_configs},
    cache_results=True,
)
@triton.jit
def _qgemm_kernel(
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, dq_absmax_ptr, lut_ptr, t_ptr, l1_ptr, bias_ptr, y_ptr,
    M, N, K, G, R, stride_xm, stride_xk, stride_cn, stride_tm, stride_l1n, stride_ym, M_BUCKET,
    FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    PER_CHANNEL: tl.constexpr, GROUP_SIZE: tl.constexpr, DQ_BLOCK: tl.constexpr, DQ_LEVELS: tl.constexpr,
    HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    offs_m, offs_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = dequant_dot_range(
        acc, x_ptr, codes_ptr, scales_ptr, zeros_ptr, dq_absmax_ptr, lut_ptr, offs_m, offs_n, 0, K, M, N, K,
        G, stride_xm, stride_xk, stride_cn, FMT, BITS, HAS_ZEROS, DOUBLE_QUANT, PER_CHANNEL, GROUP_SIZE,
        DQ_BLOCK, DQ_LEVELS, DOT_PRECISION, BLOCK_M, BLOCK_K,
    )  # fmt: skip
    store_output(
        acc, t_ptr, l1_ptr, bias_ptr, y_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_l1n, stride_ym,
        HAS_LOWRANK, HAS_BIAS, BLOCK_M, BLOCK_R, DOT_PRECISION,
    )  # fmt: skip


def qgemm(x_s: torch.Tensor, q: QTensor, t=None, l1=None, bias=None, out=None, config=None) -> torch.Tensor:
    """y [M, N] = x_s @ dequantize(q).T + t @ l1.T + bias for x_s [M, K] (already smoothed; t = x_s @ l2.T).

    out: optional [M, N] output in x_s.dtype (written in full); config: fixed launch parameters (BLOCK_M,
    BLOCK_N, BLOCK_K, num_warps) instead of the autotuned ones. Inputs are checked by the caller.
    """
    M, N = x_s.shape[0], q.shape[0]
    out = torch.empty((M, N), dtype=x_s.dtype, device=x_s.device) if out is None else out
    args, consts = gemm_launch(x_s, q, t, l1, bias, out)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    kernel = _qgemm_kernel if config is None else _qgemm_kernel.fn
    kernel[grid](*args, out.stride(0), triton.next_power_of_2(M), **consts, GROUP_M=8, **(config or {}))
    return out
