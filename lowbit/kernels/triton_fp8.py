"""FP8 W8A8 building blocks: where FP8 tensor cores run, which weights qualify, per-token activations.

For weights stored as FP8 E4M3 codes (already valid float8_e4m3fn bit patterns) a GEMM can skip
dequantization altogether on GPUs of compute capability >= 8.9 (Ada, Hopper and later), following
the per-token activation / per-channel (or per-group) weight scaling of FP8 inference (Micikevicius
et al. 2022, "FP8 Formats for Deep Learning"; Xiao et al. 2023, "SmoothQuant", per-token scales):

    s_x[m] = max_k |x_s[m, k]| / 448,   x_q = E4M3(x_s / s_x)                         (per token)
    y[m, n] = s_x[m] * sum_g s[n, g] * sum_{k in group g} x_q[m, k] * c[n, k] + t @ l1.T + bias

The activation rounding makes this an approximation of the reference (relative error of order 2^-4
per activation, averaged over K), so it is opt-in (backends "triton_w8a8", "triton_w8a8_scaled_mm",
`lowbit.kernels.triton_w8a8`) and used for M > 16 only: at decode sizes the weight-only kernel reads
the same bytes and keeps the reference's numerics. Here: `w8a8_applies`, and the per-token
quantization (`quantize_activations`, its definition; `quantize_activations_fused`, one launch) that
the `torch._scaled_mm` path runs before its GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton_common import (
    interpreting,
)
from lowbit.quantizers import QTensor

E4M3_MAX = 448.0
# the same for kernels (a jitted function reads only constexpr globals)
E4M3_MAX_C = tl.constexpr(E4M3_MAX)
TINY_C = tl.constexpr(torch.finfo(torch.float32).tiny)
# smallest K tile of the W8A8 kernel: a group size must be a multiple of it
MIN_BLOCK_K = 32


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
