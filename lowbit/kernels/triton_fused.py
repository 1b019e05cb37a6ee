"""Triton split-K kernel for every stored format: the quantized linear in one launch, at any M.

    y = x_s @ dequantize(Q).T + (x_s @ L2.T) @ L1.T + bias,   x_s = x / smooth

For the weights the decode layout does not take (`lowbit.kernels.layout.supports`: NF below 4 bits,
FP8, group sizes the decode tiles do not take, fp32 activations), read as the checkpoint
stores them. The grid, the low-rank prologue, the split-K reduction and the epilogue
are those of `triton_splitk` (one launch: no torch op before or after the kernel). Each weight program
dequantizes its [BLOCK_N, BLOCK_K] tiles with `triton_common.load_weight_tile` (fp32 s * value, rounded
to the activation dtype as the reference rounds it), multiplies them by x.T [BLOCK_K, BLOCK_M] on the
tensor cores (rows of x past M are zeros) and accumulates a y.T tile [BLOCK_N, BLOCK_M] in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton_common import format_constexprs, interpreting, load_weight_tile, weight_args
from lowbit.kernels.triton_splitk import (
    dot,
    finish,
    launch_parts,
    load_x,
    prologue,
    smoothed_input,
    split_config,
    weight_range,
)
from lowbit.quantizers import QTensor

BLOCK_N = 128
NUM_WARPS = 4
NUM_STAGES = 1


@triton.jit
def _fused_kernel(
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, dq_absmax_ptr, lut_ptr, inv_smooth_ptr, l2_ptr, l1_ptr, bias_ptr,
    y_ptr, xs_ptr, ws_ptr, t_ptr, lock_ptr,
    M, N, K, G, R, stride_xm, stride_cn, stride_l2r, stride_l1n, stride_ym,
    FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    PER_CHANNEL: tl.constexpr, GROUP_SIZE: tl.constexpr, DQ_BLOCK: tl.constexpr, DQ_LEVELS: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr, T_PROGS: tl.constexpr, T_BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    HAS_PROLOGUE: tl.constexpr = HAS_SMOOTH or HAS_LOWRANK
    pro_progs = prologue(
        x_ptr, inv_smooth_ptr, xs_ptr, l2_ptr, t_ptr, lock_ptr, pid, M, K, R, stride_xm, stride_l2r,
        HAS_SMOOTH, HAS_LOWRANK, DOT_IEEE, BLOCK_M, BLOCK_R, BLOCK_K, T_PROGS, T_BLOCK_K,
    )  # fmt: skip
    if pid < pro_progs:
        return
    x_ptr, stride_xm = smoothed_input(x_ptr, xs_ptr, lock_ptr, stride_xm, K, pro_progs, HAS_SMOOTH)
    offs_m, offs_n, k_begin, k_end, tile = weight_range(pid - pro_progs, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K,
                                                        SPLIT_K)  # fmt: skip
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y.T tile
    for k0 in range(k_begin, k_end, BLOCK_K):
        x = load_x(x_ptr, None, offs_m, k0 + tl.arange(0, BLOCK_K), M, K, stride_xm, False, False)
        w = load_weight_tile(
            codes_ptr, scales_ptr, zeros_ptr, dq_absmax_ptr, lut_ptr, offs_n, k0, N, K, G, stride_cn,
            FMT, BITS, HAS_ZEROS, DOUBLE_QUANT, PER_CHANNEL, GROUP_SIZE, DQ_BLOCK, DQ_LEVELS, BLOCK_K,
        )  # fmt: skip  # fp32 [BLOCK_N, BLOCK_K], 0 outside W
        acc = dot(w.to(dtype), x, DOT_IEEE, acc)
    finish(
        acc, offs_m, offs_n, tile, ws_ptr, t_ptr, l1_ptr, bias_ptr, y_ptr, lock_ptr, M, N, R, stride_l1n,
        stride_ym, pro_progs, HAS_PROLOGUE, HAS_LOWRANK, HAS_BIAS, DOT_IEEE, BLOCK_M, BLOCK_N, BLOCK_R,
        SPLIT_K,
    )  # fmt: skip


def block_k(q: QTensor) -> int:
    """The K tile for q: 64 columns, 32 for groups of 32 (a tile in one group: one scale per row and
    tile); other group sizes read a scale per column."""
    spec = q.spec
    return 32 if spec.groups(q.shape[1]) > 1 and spec.group_size % 64 and spec.group_size % 32 == 0 else 64


def fused_config(m: int, n: int, k: int, tile: int, rank: int, smooth: bool, sms: int) -> dict:
    """Launch constexprs for the row bucket of m rows (`triton_splitk.split_config`), the K tile."""
    return dict(split_config(m, n, k, tile, BLOCK_N, rank, smooth, sms), BLOCK_K=tile, num_stages=NUM_STAGES)


def fused(x: torch.Tensor, q: QTensor, l1, l2, inv_smooth, bias, config: dict, out=None) -> torch.Tensor:
    """y [M, N] = (x * inv_smooth) @ dequantize(q).T + ((x * inv_smooth) @ l2.T) @ l1.T + bias, one launch.

    x [M, K] (unit stride along K) in float16, bfloat16 or float32; l1 [N, r] (r <= MAX_RANK), l2
    [r, K], bias [N] in x's dtype, inv_smooth float32 [K]; config from `fused_config`. Inputs are
    checked at preparation time, not here.
    """
    M, K = x.shape
    N = q.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    scratch, R, grid, modes = launch_parts(x, N, BLOCK_N, l1, inv_smooth, bias, config)
    codes, scales, zeros, dq_absmax, lut = weight_args(q, x.device)
    _fused_kernel[grid](
        x, codes, scales, zeros, dq_absmax, lut, inv_smooth, l2, l1, bias, y, *scratch,
        M, N, K, scales.shape[1], R, x.stride(0), codes.stride(0), 0 if l2 is None else l2.stride(0),
        0 if l1 is None else l1.stride(0), y.stride(0),
        **format_constexprs(q), DOT_IEEE=interpreting() or x.dtype == torch.float32, BLOCK_N=BLOCK_N,
        num_warps=NUM_WARPS, **modes, **config,
    )  # fmt: skip
    return y
