"""The Triton backends of the quantized linear: check, pick the kernel by row count, launch.

`qlinear` (backend "triton") computes `lowbit.kernels.reference.qlinear` with the split-K GEMV for
M <= 16 activation rows and the GEMM above (a prepared layer, `lowbit.kernels.prepared`, calls `run`:
its inputs were checked once). `qlinear_w8a8` (backend "triton_w8a8") runs FP8 E4M3 weights through
the one-launch FP8 W8A8 kernel (`triton_w8a8`, "fused") at M > 16 on GPUs that have FP8 tensor
cores, and the one-launch weight-only kernel (`triton_fused`) at M <= 16, where it reads the same
bytes and keeps the reference's numerics; `qlinear_w8a8_scaled_mm` (backend "triton_w8a8_scaled_mm")
is the same with `torch._scaled_mm` above 16 rows. Other weights run `qlinear`. All take the
reference's arguments; x [..., K] may have any leading dims.

Importing this module compiles nothing, but it imports triton: with TRITON_INTERPRET=1 in the
environment at that moment the kernels run in Triton's CPU interpreter (on CPU tensors).
"""

from __future__ import annotations

import torch

from lowbit.kernels import triton_fp8, triton_fused, triton_splitk, triton_w8a8
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


def _w8a8_rows(impl: str):
    """`run` with per-token FP8 activations (`triton_w8a8.IMPLS[impl]`) for FP8 E4M3 weights at M > 16
    and the one-launch weight-only kernel at M <= 16 (ranks up to triton_splitk.MAX_RANK)."""

    def rows(x2: torch.Tensor, q: QTensor, l1, l2, smooth, bias) -> torch.Tensor:
        rank = 0 if l1 is None else l1.shape[1]
        if not triton_fp8.w8a8_applies(q, x2.device) or rank > triton_splitk.MAX_RANK:
            return run(x2, q, l1, l2, smooth, bias)
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        l1, l2, bias = (None if t is None else t.to(x2.dtype) for t in (l1, l2, bias))
        inv = None if smooth is None else 1.0 / smooth.float()
        M, (N, K) = x2.shape[0], q.shape
        if M <= MAX_ROWS:
            sms, tile = triton_splitk.multiprocessors(x2.device), triton_fused.block_k(q)
            config = triton_fused.fused_config(M, N, K, tile, rank, smooth is not None, sms)
            return triton_fused.fused(x2, q, l1, l2, inv, bias, config)
        name = impl if impl == "fused" or triton_w8a8.scaled_mm_applies(q) else "fused"
        return triton_w8a8.IMPLS[name](x2, q, l1, l2, inv, bias)

    return rows


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
qlinear_w8a8 = _entry(_w8a8_rows("fused"), "`qlinear` with per-token FP8 activations for FP8 E4M3 weights.")
qlinear_w8a8_scaled_mm = _entry(_w8a8_rows("scaled_mm"), "`qlinear_w8a8` with torch._scaled_mm (M > 16).")
