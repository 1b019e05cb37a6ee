"""Quantized linear kernels: the pure-torch reference (the definition), fused Triton kernels and the
backend dispatch (`qlinear(..., backend="auto" | "reference" | "triton" | "triton_w8a8")`).

The Triton modules (`triton_qlinear`, `triton_gemm`, `triton_gemv`, `triton_fp8`, `triton_common`) are
imported on first use, so `import lowbit.kernels` never imports triton.
"""

from lowbit.kernels.dispatch import BACKENDS, BackendError, qlinear
from lowbit.kernels.reference import KernelInputError

__all__ = ["BACKENDS", "BackendError", "KernelInputError", "qlinear"]
