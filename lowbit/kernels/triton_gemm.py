"""Triton GEMM for the quantized linear at M > 16 rows (prefill, batched decode).

`qgemm` computes the reference's function (`lowbit.kernels.reference`)

    y [M, N] = (x / smooth) @ dequantize(Q).T + t @ l1.T + bias,   t = (x / smooth) @ l2.T

with one kernel in the layout of the Triton matmul tutorial: each program owns a BLOCK_M x BLOCK_N
tile of y; its K loop loads packed codes and their group scales, dequantizes them in registers
(`triton_common.load_weight_tile`) and accumulates x_s @ W.T in fp32 with tl.dot. The low-rank
down-projection t [M, r] is computed once beforehand (a small matmul); the epilogue adds t @ l1.T
while the accumulator is still in registers, then the bias, and casts to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton_common import (
    add_lowrank_and_bias,
    dot_nt,
    dot_precision,
    epilogue_args,
    format_constexprs,
    interpreting,
    load_weight_tile,
    rank_block,
    tile_ids,
    weight_args,
)
from lowbit.quantizers import QTensor


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


GEMM_CONFIGS = [
    _config(16, 64, 64, 4, 4),
    _config(16, 64, 128, 4, 4),
    _config(32, 64, 64, 4, 4),
    _config(32, 64, 128, 4, 4),
    _config(32, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 128, 128, 8, 3),
    _config(128, 64, 64, 4, 4),
    _config(128, 128, 64, 8, 3),
    _config(128, 256, 64, 8, 3),
]
# The one configuration the CPU interpreter runs (its cost is per program and per operation, not per
# element); BLOCK_K = 64 exercises both scale paths (group sizes 64, 128: whole tiles; 32, 48: not).
INTERPRETER_GEMM_CONFIG = _config(32, 64, 64, 4, 1)


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
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, dq_absmax_ptr, lut_ptr,
    smooth_ptr, t_ptr, l1_ptr, bias_ptr, y_ptr,
    M, N, K, G, R, M_BUCKET,
    stride_xm, stride_xk, stride_cn, stride_tm, stride_l1n, stride_ym,
    FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    PER_CHANNEL: tl.constexpr, GROUP_SIZE: tl.constexpr, DQ_BLOCK: tl.constexpr, DQ_LEVELS: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M * K may pass 2^31 in a long prefill
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=x_mask, other=0.0)
        if HAS_SMOOTH:
            smooth = tl.load(smooth_ptr + offs_k, mask=offs_k < K, other=1.0)
            x = (x.to(tl.float32) / smooth.to(tl.float32)[None, :]).to(x_ptr.dtype.element_ty)
        w = load_weight_tile(
            codes_ptr, scales_ptr, zeros_ptr, dq_absmax_ptr, lut_ptr, offs_n, k0, N, K, G, stride_cn,
            FMT, BITS, HAS_ZEROS, DOUBLE_QUANT, PER_CHANNEL, GROUP_SIZE, DQ_BLOCK, DQ_LEVELS, BLOCK_K,
        )  # fmt: skip
        acc = dot_nt(x, w.to(x_ptr.dtype.element_ty), acc, BLOCK_M, DOT_PRECISION)
    acc = add_lowrank_and_bias(
        acc, t_ptr, l1_ptr, bias_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_l1n,
        HAS_LOWRANK, HAS_BIAS, BLOCK_M, BLOCK_R, DOT_PRECISION,
    )  # fmt: skip
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y, mask=y_mask)


def qgemm(
    x: torch.Tensor,
    q: QTensor,
    t: torch.Tensor | None = None,
    l1: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """y [M, N] = (x / smooth) @ dequantize(q).T + t @ l1.T + bias for x [M, K] (t = x_s @ l2.T, [M, r]).

    out: optional [M, N] output in x.dtype (written in full); config: fixed launch parameters (BLOCK_M,
    BLOCK_N, BLOCK_K, num_warps) instead of the autotuned ones. Inputs are checked by the caller.
    """
    M, K = x.shape
    N = q.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    l1, smooth, bias, R = epilogue_args(l1, smooth, bias, x.dtype)
    codes, scales, zeros, dq_absmax, lut = weight_args(q, x.device)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    kernel = _qgemm_kernel if config is None else _qgemm_kernel.fn
    kernel[grid](
        x, codes, scales, zeros, dq_absmax, lut, smooth, t, l1, bias, out,
        M, N, K, scales.shape[1], R, triton.next_power_of_2(M),
        x.stride(0), x.stride(1), codes.stride(0), 0 if t is None else t.stride(0),
        0 if l1 is None else l1.stride(0), out.stride(0),
        **format_constexprs(q), HAS_SMOOTH=smooth is not None, HAS_LOWRANK=R > 0, HAS_BIAS=bias is not None,
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_block(R), GROUP_M=8, **(config or {}),
    )  # fmt: skip
    return out
