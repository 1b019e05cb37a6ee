"""The Triton backends of the quantized linear: check, pick the kernel by row count, launch.

`qlinear` (backend "triton") computes `lowbit.kernels.reference.qlinear` with the split-K GEMV for
M <= 16 activation rows and the GEMM above; `qlinear_w8a8` (backend "triton_w8a8") runs FP8 E4M3
weights through the FP8 W8A8 GEMM at M > 16 on GPUs that have FP8 tensor cores and is `qlinear`
everywhere else. Both take the reference's arguments; x [..., K] may have any leading dims.

Importing this module compiles nothing, but it imports triton: with TRITON_INTERPRET=1 in the
environment at that moment the kernels run in Triton's CPU interpreter (on CPU tensors).
"""

from __future__ import annotations

import torch

from lowbit.kernels import triton_fp8
from lowbit.kernels.reference import KernelInputError, check_inputs
from lowbit.kernels.triton_common import DTYPES, lowrank_down
from lowbit.kernels.triton_gemm import qgemm
from lowbit.kernels.triton_gemv import MAX_ROWS, qgemv
from lowbit.quantizers import QTensor


def _prepare(x, q, l1, l2, smooth, bias) -> torch.Tensor:
    """Check the inputs; x as a 2-D [M, K] view (or copy)."""
    check_inputs(x, q, l1, l2, smooth, bias)
    if x.dtype not in DTYPES:
        raise KernelInputError(f"the triton backend computes in float16, bfloat16 or float32, got {x.dtype}")
    for name, t in (("codes", q.codes), ("l1", l1), ("l2", l2), ("smooth", smooth), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise KernelInputError(f"qlinear input is on {x.device} but {name} is on {t.device}")
    return x.reshape(-1, x.shape[-1])


def qlinear(
    x: torch.Tensor,
    q: QTensor,
    l1: torch.Tensor | None = None,
    l2: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [..., N] = (x / smooth) @ dequantize(q).T + ((x / smooth) @ l2.T) @ l1.T + bias, fused in Triton."""
    x2 = _prepare(x, q, l1, l2, smooth, bias)  # x2: [M, K]
    M, N = x2.shape[0], q.shape[0]
    if M == 0:
        return x.new_empty((*x.shape[:-1], N))
    # the low-rank down-projection t [M, r], computed once, as the reference computes it
    x_s = x2 if smooth is None or l2 is None else x2 / smooth.to(x.dtype)
    t = lowrank_down(x_s, l2)
    kernel = qgemv if M <= MAX_ROWS else qgemm
    return kernel(x2, q, t, l1, smooth, bias).reshape(*x.shape[:-1], N)


def qlinear_w8a8(
    x: torch.Tensor,
    q: QTensor,
    l1: torch.Tensor | None = None,
    l2: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`qlinear` with per-token FP8 activations for FP8 E4M3 weights at M > 16 where FP8 tl.dot runs."""
    x2 = _prepare(x, q, l1, l2, smooth, bias)
    M, N = x2.shape[0], q.shape[0]
    if M <= MAX_ROWS or not triton_fp8.w8a8_applies(q, x.device):
        return qlinear(x, q, l1, l2, smooth, bias)
    x_s = x2 if smooth is None else x2 / smooth.to(x.dtype)  # x_s: [M, K]
    y = triton_fp8.w8a8_gemm(x_s, q, lowrank_down(x_s, l2), l1, bias)
    return y.reshape(*x.shape[:-1], N)
