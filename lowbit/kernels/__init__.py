"""Quantized linear kernels: the pure-torch reference (the definition), fused Triton kernels and the
backend dispatch (`qlinear(..., backend="auto" | "reference" | "triton" | "triton_w8a8")`).

The Triton modules (`triton_qlinear`, `triton_decode` with `triton_dequant`, `triton_large`,
`triton_gemm`, `triton_gemv`, `triton_fp8`, `triton_common`) are imported on first use, so
`import lowbit.kernels` never imports triton. A layer prepared once for inference (`prepared`: checks,
the split-K kernel's weight `layout`, launch configurations per row bucket) runs one launch per call
below its format's crossover M and two (dequantize, one GEMM) from it; `trace` counts the launches of
a call on the CPU.
"""

from lowbit.kernels.dispatch import BACKENDS, BackendError, qlinear
from lowbit.kernels.reference import KernelInputError

__all__ = ["BACKENDS", "BackendError", "KernelInputError", "qlinear"]
