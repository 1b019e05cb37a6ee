"""FP8 W8A8 GEMM: FP8 E4M3 weights times per-token FP8 activations on FP8 tensor cores.

For weights stored as FP8 E4M3 codes (already valid float8_e4m3fn bit patterns) the GEMM can skip
dequantization altogether on GPUs of compute capability >= 8.9 (Ada, Hopper and later), following
the per-token activation / per-channel (or per-group) weight scaling of FP8 inference (Micikevicius
et al. 2022, "FP8 Formats for Deep Learning"; Xiao et al. 2023, "SmoothQuant", per-token scales):

    s_x[m] = max_k |x_s[m, k]| / 448,   x_q = E4M3(x_s / s_x)                         (per token)
    y[m, n] = s_x[m] * sum_g s[n, g] * sum_{k in group g} x_q[m, k] * c[n, k] + t @ l1.T + bias

Each K tile lies in one scale group (BLOCK_K divides the group size), so its FP8 tl.dot partial
product is scaled by that group's s[n, g] before it is accumulated in fp32; s_x scales the finished
row. The activation rounding makes this an approximation of the reference (relative error of order
2^-4 per activation, averaged over K), so it is opt-in (backend "triton_w8a8") and used for M > 16
only: at decode sizes the weight-only GEMV reads the same bytes and keeps the reference's numerics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton_common import (
    dot_precision,
    epilogue_args,
    format_constexprs,
    interpreting,
    load_group_scales,
    rank_block,
    store_output,
    tile_ids,
    weight_args,
)
from lowbit.kernels.triton_gemm import fit_tiles, tile_config
from lowbit.quantizers import QTensor

E4M3_MAX = 448.0
# the same for kernels (a jitted function reads only constexpr globals)
E4M3_MAX_C = tl.constexpr(E4M3_MAX)
TINY_C = tl.constexpr(torch.finfo(torch.float32).tiny)
# smallest BLOCK_K of the configurations: a group size must be a multiple of it
MIN_BLOCK_K = 32


W8A8_CONFIGS = [
    tile_config(32, 64, 128, 4, 4),
    tile_config(64, 64, 128, 4, 4),
    tile_config(64, 128, 128, 4, 4),
    tile_config(128, 128, 128, 8, 3),
    tile_config(128, 256, 128, 8, 3),
    tile_config(64, 128, 64, 4, 4),
    tile_config(128, 128, 64, 8, 3),
    tile_config(64, 128, 32, 4, 4),
]


def fp8_dot_supported(device: torch.device) -> bool:
    """Whether FP8 E4M3 tl.dot runs on `device`: NVIDIA compute capability >= 8.9, or the CPU interpreter."""
    if device.type == "cpu":
        return interpreting()
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def w8a8_applies(q: QTensor, device: torch.device) -> bool:
    """The W8A8 kernel takes `q`: FP8 E4M3 codes, per-channel or group sizes that are whole K tiles."""
    spec = q.spec
    whole_tiles = spec.groups(q.shape[1]) == 1 or spec.group_size % MIN_BLOCK_K == 0
    return spec.format == "fp8_e4m3" and whole_tiles and fp8_dot_supported(device)


def prune_w8a8_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Keep configurations whose K tile divides the group size, then `fit_tiles`; under the interpreter
    one small configuration."""
    args = {**named_args, **kwargs}
    whole = args["PER_CHANNEL"]
    if interpreting():
        return [tile_config(32, 64, 64 if whole or args["GROUP_SIZE"] % 64 == 0 else MIN_BLOCK_K, 4, 1)]
    if not whole:
        configs = [c for c in configs if args["GROUP_SIZE"] % c.kwargs["BLOCK_K"] == 0]
    return fit_tiles(configs, args)


def quantize_activations(x_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 E4M3 quantization of x_s [M, K]: (x_q float8_e4m3fn [M, K], s_x float32 [M]).

    s_x[m] = max_k |x_s[m, k]| / 448 (a tiny positive number for an all-zero row), x_q = x_s / s_x
    rounded to nearest even.
    """
    amax = x_s.abs().amax(dim=1).float()  # [M]
    s_x = (amax / E4M3_MAX).clamp_(min=torch.finfo(torch.float32).tiny)
    x_q = (x_s.float() / s_x[:, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x_q, s_x


@triton.jit
def _quantize_rows_kernel(x_ptr, xq_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    """Row m of x_s [M, K]: s[m] = max(max_k |x_s[m, k]| / 448, tiny), xq[m] = E4M3(clamp(x_s[m] / s[m]))."""
    m = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.maximum(tl.max(amax, axis=0) / E4M3_MAX_C, TINY_C)
    tl.store(s_ptr + m, s)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        q = tl.clamp(x / s, -E4M3_MAX_C, E4M3_MAX_C)
        tl.store(xq_ptr + m * stride_qm + offs_k, q.to(tl.float8e4nv), mask=offs_k < K)


def quantize_activations_fused(x_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_activations` in one launch (one program per row, x_s read twice)."""
    M, K = x_s.shape
    x_q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x_s.device)
    s_x = torch.empty(M, dtype=torch.float32, device=x_s.device)
    block_k = min(4096, triton.next_power_of_2(K))
    _quantize_rows_kernel[(M,)](x_s, x_q, s_x, K, x_s.stride(0), x_q.stride(0), BLOCK_K=block_k, num_warps=4)
    return x_q, s_x


@triton.autotune(
    configs=W8A8_CONFIGS,
    key=["M_BUCKET", "N", "K", "GROUP_SIZE", "HAS_LOWRANK"],
    prune_configs_by={"early_config_prune": prune_w8a8_configs},
    cache_results=True,
)
@triton.jit
def _w8a8_gemm_kernel(
    xq_ptr, x_scale_ptr, codes_ptr, scales_ptr, dq_absmax_ptr, t_ptr, l1_ptr, bias_ptr, y_ptr,
    M, N, K, G, R, M_BUCKET,
    stride_xm, stride_cn, stride_tm, stride_l1n, stride_ym,
    DOUBLE_QUANT: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP_SIZE: tl.constexpr,
    DQ_BLOCK: tl.constexpr, DQ_LEVELS: tl.constexpr,
    HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    offs_m, offs_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x_q = tl.load(xq_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        c_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        codes = tl.load(codes_ptr + offs_n[:, None] * stride_cn + offs_k[None, :], mask=c_mask, other=0)
        part = tl.dot(x_q, tl.trans(codes.to(tl.float8e4nv, bitcast=True)))  # [BLOCK_M, BLOCK_N] fp32
        if PER_CHANNEL:
            acc += part
        else:
            s, _, _ = load_group_scales(
                scales_ptr, dq_absmax_ptr, offs_n, k0, N, K, G,
                DOUBLE_QUANT, PER_CHANNEL, GROUP_SIZE, DQ_BLOCK, DQ_LEVELS, BLOCK_K,
            )  # fmt: skip
            acc += part * tl.reshape(s, (1, BLOCK_N))
    if PER_CHANNEL:
        s, _, _ = load_group_scales(
            scales_ptr, dq_absmax_ptr, offs_n, 0, N, K, G,
            DOUBLE_QUANT, PER_CHANNEL, GROUP_SIZE, DQ_BLOCK, DQ_LEVELS, BLOCK_K,
        )  # fmt: skip
        acc = acc * tl.reshape(s, (1, BLOCK_N))
    acc = acc * tl.load(x_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    store_output(
        acc, t_ptr, l1_ptr, bias_ptr, y_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_l1n, stride_ym,
        HAS_LOWRANK, HAS_BIAS, BLOCK_M, BLOCK_R, DOT_PRECISION,
    )  # fmt: skip


def w8a8_gemm(x_s: torch.Tensor, q: QTensor, t=None, l1=None, bias=None, out=None) -> torch.Tensor:
    """y [M, N] ~ x_s @ dequantize(q).T + t @ l1.T + bias with x_s [M, K] quantized per token to FP8.

    x_s is the (already smoothed) activation; q must satisfy `w8a8_applies`. out: optional [M, N]
    output in x_s.dtype. Inputs are checked by the caller.
    """
    M, K = x_s.shape
    N = q.shape[0]
    dtype = x_s.dtype
    out = torch.empty((M, N), dtype=dtype, device=x_s.device) if out is None else out
    # one launch on a GPU; the interpreter's fp32 -> E4M3 conversion drops the carry of a rounding that
    # reaches the next power of two, so there the torch definition quantizes
    x_q, s_x = (quantize_activations if interpreting() else quantize_activations_fused)(x_s)
    l1, bias, R = epilogue_args(l1, bias, dtype)
    codes, scales, _, dq_absmax, _ = weight_args(q, x_s.device)
    fmt = format_constexprs(q)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _w8a8_gemm_kernel[grid](
        x_q, s_x, codes, scales, dq_absmax, t, l1, bias, out,
        M, N, K, scales.shape[1], R, triton.next_power_of_2(M),
        x_q.stride(0), codes.stride(0), 0 if t is None else t.stride(0), 0 if l1 is None else l1.stride(0),
        out.stride(0),
        DOUBLE_QUANT=fmt["DOUBLE_QUANT"], PER_CHANNEL=fmt["PER_CHANNEL"], GROUP_SIZE=fmt["GROUP_SIZE"],
        DQ_BLOCK=fmt["DQ_BLOCK"], DQ_LEVELS=fmt["DQ_LEVELS"],
        HAS_LOWRANK=R > 0, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(dtype),
        BLOCK_R=rank_block(R), GROUP_M=8,
    )  # fmt: skip
    return out
