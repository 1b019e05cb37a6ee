"""The Triton backends of the quantized linear: check, pick the kernel by row count, launch.

`qlinear` (backend "triton") computes `lowbit.kernels.reference.qlinear` with the split-K GEMV for
M <= 16 activation rows and the GEMM above (a prepared layer, `lowbit.kernels.prepared`, calls `run`:
its inputs were checked once); `qlinear_w8a8` (backend "triton_w8a8") runs FP8 E4M3
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


def _checked_rows(x, q, l1, l2, smooth, bias) -> torch.Tensor:
    """Check the inputs; x as a 2-D [M, K] view (or copy)."""
    check_inputs(x, q, l1, l2, smooth, bias)
    if x.dtype not in DTYPES:
        raise KernelInputError(f"the triton backend computes in float16, bfloat16 or float32, got {x.dtype}")
    for name, t in (("codes", q.codes), ("l1", l1), ("l2", l2), ("smooth", smooth), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise KernelInputError(f"qlinear input is on {x.device} but {name} is on {t.device}")
    return x.reshape(-1, x.shape[-1])


def run(x2: torch.Tensor, q: QTensor, l1, l2, smooth, bias) -> torch.Tensor:
    """y [M, N] for x2 [M, K] (M > 0) with the GEMV (M <= 16) or the GEMM, inputs already checked."""
    # x smoothed once, and the low-rank down-projection t [M, r], as the reference computes them
    x_s = x2 if smooth is None else x2 / smooth.to(x2.dtype)  # x_s: [M, K]
    kernel = qgemv if x2.shape[0] <= MAX_ROWS else qgemm
    return kernel(x_s, q, lowrank_down(x_s, l2), l1, bias)


def _run_w8a8(x2: torch.Tensor, q: QTensor, l1, l2, smooth, bias) -> torch.Tensor:
    """`run` with per-token FP8 activations where the W8A8 GEMM applies (M > 16, FP8 E4M3 weights)."""
    if x2.shape[0] <= MAX_ROWS or not triton_fp8.w8a8_applies(q, x2.device):
        return run(x2, q, l1, l2, smooth, bias)
    x_s = x2 if smooth is None else x2 / smooth.to(x2.dtype)  # x_s: [M, K]
    return triton_fp8.w8a8_gemm(x_s, q, lowrank_down(x_s, l2), l1, bias)


def _entry(rows_fn, doc: str):
    """The public form of rows_fn: check, flatten x [..., K] to rows, run, restore the leading dims."""

    def call(x: torch.Tensor, q: QTensor, l1=None, l2=None, smooth=None, bias=None) -> torch.Tensor:
        x2 = _checked_rows(x, q, l1, l2, smooth, bias)  # x2: [M, K]
        if x2.shape[0] == 0:
            return x.new_empty((*x.shape[:-1], q.shape[0]))
        return rows_fn(x2, q, l1, l2, smooth, bias).reshape(*x.shape[:-1], q.shape[0])

    call.__doc__ = doc
    return call


qlinear = _entry(run, "y [..., N] = (x / smooth) @ dequantize(q).T + ((x / smooth) @ l2.T) @ l1.T + bias.")
qlinear_w8a8 = _entry(_run_w8a8, "`qlinear` with per-token FP8 activations for FP8 E4M3 weights (M > 16).")
