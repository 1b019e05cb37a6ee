"""FP8 W8A8 in one launch: per-token activation scales, quantization and the FP8 GEMM in one kernel.

The function is that of `triton_fp8` (Micikevicius et al. 2022, "FP8 Formats for Deep Learning";
per-token activation scales as in Xiao et al. 2023, "SmoothQuant"):

    s_x[m] = max_k |x_s[m, k]| / 448,   x_q = E4M3(x_s / s_x)
    y[m, n] = s_x[m] * sum_g s[n, g] * sum_{k in group g} x_q[m, k] * c[n, k] + (x_s @ L2.T) @ L1.T + bias

Two implementations (IMPLS), chosen by backend name (`lowbit.kernels.dispatch`):

- "fused" (backend "triton_w8a8", the default): one launch with the grid, low-rank prologue and
  epilogue of `triton_splitk` (split K up to 256 rows). A weight program first reads its BLOCK_M rows
  of x_s over all of K for their amax (no other program needs them, so no scratch and no wait), then
  in its K loop (its K range) loads each x tile again, multiplies it by 1 / s_x, rounds it to E4M3
  and multiplies it by the FP8 weight tile on the FP8 tensor cores; group scales per K tile, s_x,
  t @ L1.T, bias and the output cast in the epilogue. Any group size that is a multiple of 32,
  double quantization, any activation dtype. x_s / s_x is computed as x_s * (1 / s_x), which may
  differ from the division in the last fp32 bit (and so, at an exact E4M3 tie, by one E4M3 step).
- "scaled_mm" (backend "triton_w8a8_scaled_mm"): the per-token quantization kernel of `triton_fp8`,
  then `torch._scaled_mm` with row-wise scales (cuBLASLt), then the low-rank term and the bias: two
  launches at rank 0 without bias, more with them; per-channel scales only (other weights run
  "fused").

Why "fused" is the default: it is one launch at every M with every part of the layer inside, and it
takes group scales. PREDICTED, not measured (no GPU has run either): "fused" is faster while the
layer is memory- or launch-bound (M up to a few hundred rows: the separate quantization pass and
launch cost 5-20 us there), `torch._scaled_mm` from about M = 2048 on an H100, where cuBLASLt's FP8
GEMM outruns a Triton FP8 GEMM that also re-reads x once for the amax and converts every x tile on
the warps that issue the MMAs. `scripts/gpu_check.py` times both ("fp8-w8a8" and
"fp8-w8a8-scaled-mm").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton_common import format_constexprs, interpreting, load_group_scales, weight_args
from lowbit.kernels.triton_fp8 import E4M3_MAX_C, TINY_C, quantize_activations, quantize_activations_fused
from lowbit.kernels.triton_splitk import (
    MAX_SPLIT_ROWS,
    finish,
    launch_parts,
    load_x,
    multiprocessors,
    prologue,
    row_bucket,
    smoothed_input,
    split_config,
    weight_range,
)
from lowbit.quantizers import QTensor

NUM_STAGES = 3


@triton.jit
def _round_e4m3(v):
    """v (fp32, |v| <= 448) rounded to nearest even on the E4M3 grid, still in fp32: the interpreter's
    fp32 -> E4M3 conversion does not round to nearest even, so it is given values it need not round."""
    e = tl.maximum((v.to(tl.int32, bitcast=True) >> 23) & 0xFF, 127 - 6)  # biased exponent, subnormals 2^-6
    step = ((e - 3) << 23).to(tl.float32, bitcast=True)  # 2^(e - 127 - 3): three mantissa bits
    y = v / step  # exact, |y| <= 16
    return ((y + 12582912.0) - 12582912.0) * step  # 1.5 * 2^23: fp32 addition rounds y to nearest even


@triton.jit
def _w8a8_kernel(
    x_ptr, codes_ptr, scales_ptr, dq_absmax_ptr, inv_smooth_ptr, l2_ptr, l1_ptr, bias_ptr, y_ptr,
    xs_ptr, ws_ptr, t_ptr, lock_ptr,
    M, N, K, G, R, stride_xm, stride_cn, stride_l2r, stride_l1n, stride_ym,
    DOUBLE_QUANT: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP_SIZE: tl.constexpr,
    DQ_BLOCK: tl.constexpr, DQ_LEVELS: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr,
    ROUND_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr, T_PROGS: tl.constexpr, T_BLOCK_K: tl.constexpr,
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
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)  # per-token amax of this program's rows, over all of K
    for k0 in range(0, K, BLOCK_K):
        x = load_x(x_ptr, None, offs_m, k0 + tl.arange(0, BLOCK_K), M, K, stride_xm, False, False)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    s_x = tl.maximum(amax / E4M3_MAX_C, TINY_C)  # [BLOCK_M]
    inv_x = 1.0 / s_x
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y.T tile
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_x(x_ptr, None, offs_m, offs_k, M, K, stride_xm, False, False)
        v = x.to(tl.float32) * inv_x[:, None]  # |v| <= 448 but for rounding: the conversion saturates
        if ROUND_IN_FP32:
            v = _round_e4m3(tl.clamp(v, -E4M3_MAX_C, E4M3_MAX_C))
        c_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        codes = tl.load(codes_ptr + offs_n[:, None] * stride_cn + offs_k[None, :], mask=c_mask, other=0)
        part = tl.dot(codes.to(tl.float8e4nv, bitcast=True), tl.trans(v.to(tl.float8e4nv)))  # [BN, BM]
        if PER_CHANNEL:
            acc += part
        else:  # the K tile lies in one group: s [BLOCK_N, 1]
            s, _, _ = load_group_scales(
                scales_ptr, dq_absmax_ptr, offs_n, k0, N, K, G,
                DOUBLE_QUANT, PER_CHANNEL, GROUP_SIZE, DQ_BLOCK, DQ_LEVELS, BLOCK_K,
            )  # fmt: skip
            acc += part * s
    if PER_CHANNEL:
        s, _, _ = load_group_scales(
            scales_ptr, dq_absmax_ptr, offs_n, 0, N, K, G,
            DOUBLE_QUANT, PER_CHANNEL, GROUP_SIZE, DQ_BLOCK, DQ_LEVELS, BLOCK_K,
        )  # fmt: skip
        acc = acc * s
    finish(
        acc * s_x[None, :], offs_m, offs_n, tile, ws_ptr, t_ptr, l1_ptr, bias_ptr, y_ptr, lock_ptr, M, N, R,
        stride_l1n, stride_ym, pro_progs, HAS_PROLOGUE, HAS_LOWRANK, HAS_BIAS, DOT_IEEE, BLOCK_M, BLOCK_N,
        BLOCK_R, SPLIT_K,
    )  # fmt: skip


def w8a8_config(m: int, n: int, k: int, group_size: int | None, rank: int, smooth: bool, sms: int) -> dict:
    """Launch constexprs for the row bucket of m rows: up to MAX_SPLIT_ROWS rows `split_config`'s BLOCK_M
    (32, 64) and SPLIT_K with BLOCK_N 128 and 4 warps (enough programs to read the weight at full
    bandwidth); above, 128 x 256 tiles, 8 warps, no split (the x conversion amortised over more weights);
    BLOCK_K the largest of 128, 64, 32 that divides the group size."""
    block_k = next(b for b in (128, 64, 32) if group_size is None or group_size % b == 0)
    small = row_bucket(m) <= MAX_SPLIT_ROWS
    block_n = 128 if small else 256
    config = split_config(m, n, k, block_k, block_n, rank, smooth, sms)
    if not small:
        config.update(BLOCK_M=128, SPLIT_K=1)
    return dict(config, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4 if small else 8, num_stages=NUM_STAGES)


def w8a8_fused(x: torch.Tensor, q: QTensor, l1, l2, inv_smooth, bias, out=None) -> torch.Tensor:
    """y [M, N] ~ (x * inv_smooth) @ dequantize(q).T + low rank + bias with per-token FP8 activations, in
    one launch. x [M, K] (unit stride along K); l1, l2, bias in x's dtype; inv_smooth float32 [K];
    q satisfies `triton_fp8.w8a8_applies`. Inputs are checked by the caller."""
    M, K = x.shape
    N = q.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    fmt = format_constexprs(q)
    rank, sms = 0 if l1 is None else l1.shape[1], multiprocessors(x.device)
    config = w8a8_config(M, N, K, fmt["GROUP_SIZE"], rank, inv_smooth is not None, sms)
    scratch, R, grid, modes = launch_parts(x, N, config["BLOCK_N"], l1, inv_smooth, bias, config)
    codes, scales, _, dq_absmax, _ = weight_args(q, x.device)
    _w8a8_kernel[grid](
        x, codes, scales, dq_absmax, inv_smooth, l2, l1, bias, y, *scratch,
        M, N, K, scales.shape[1], R, x.stride(0), codes.stride(0), 0 if l2 is None else l2.stride(0),
        0 if l1 is None else l1.stride(0), y.stride(0),
        DOUBLE_QUANT=fmt["DOUBLE_QUANT"], PER_CHANNEL=fmt["PER_CHANNEL"], GROUP_SIZE=fmt["GROUP_SIZE"],
        DQ_BLOCK=fmt["DQ_BLOCK"], DQ_LEVELS=fmt["DQ_LEVELS"], ROUND_IN_FP32=interpreting(),
        DOT_IEEE=interpreting() or x.dtype == torch.float32, **modes, **config,
    )  # fmt: skip
    return y


def scaled_mm_applies(q: QTensor) -> bool:
    """`w8a8_scaled_mm` takes q: per-channel scales stored as floats (row-wise scaling)."""
    return q.spec.groups(q.shape[1]) == 1 and not q.spec.double_quant


def w8a8_scaled_mm(x: torch.Tensor, q: QTensor, l1, l2, inv_smooth, bias) -> torch.Tensor:
    """`w8a8_fused`'s function with `torch._scaled_mm`: quantize x_s per token (one launch), the row-wise
    scaled FP8 GEMM (bf16 output), then the low-rank term and the bias. q: `scaled_mm_applies`."""
    x_s = x if inv_smooth is None else (x.float() * inv_smooth).to(x.dtype)  # x_s: [M, K]
    x_q, s_x = (quantize_activations if interpreting() else quantize_activations_fused)(x_s)
    # [N, K] (rows padded to whole bytes of 8 codes); its .T is the column-major operand cuBLASLt takes
    w_q = q.codes.view(torch.float8_e4m3fn)[:, : x.shape[1]]
    s_w = q.scales.float().reshape(1, -1)  # [1, N]
    y = torch._scaled_mm(x_q, w_q.T, scale_a=s_x[:, None], scale_b=s_w, out_dtype=torch.bfloat16).to(x.dtype)
    if l1 is not None:
        y = torch.addmm(y, x_s @ l2.T, l1.T)  # [M, r] @ [r, N]
    return y if bias is None else y + bias


IMPLS = {"fused": w8a8_fused, "scaled_mm": w8a8_scaled_mm}
