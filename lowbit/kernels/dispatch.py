"""Backend choice for the quantized linear, registered as the `lowbit::qlinear` torch op.

`qlinear(x, q, l1, l2, smooth, bias, backend="auto")` computes the same function as
`lowbit.kernels.reference.qlinear` with the chosen backend. The call goes through
`torch.library.custom_op` so `torch.compile` sees one opaque op with a shape rule (fake kernel) and
an analytic backward (gradients for x, l1, l2, smooth and bias; the quantized weight is a constant).

Backends (BACKENDS):
- "reference": pure torch, the definition; any device and floating dtype.
- "triton": fused Triton kernels (`lowbit.kernels.triton_qlinear.qlinear`) for float16, bfloat16 and
  float32 activations on CUDA GPUs; on CPU tensors only under Triton's interpreter
  (TRITON_INTERPRET=1 set before the kernels are first used), which is how the tests run them.
- "triton_w8a8": "triton" with FP8 activations for FP8 E4M3 weights (compute capability >= 8.9);
  an approximation of the reference, so never chosen by "auto". One launch (`triton_w8a8`).
- "triton_w8a8_scaled_mm": "triton_w8a8" with `torch._scaled_mm` (row-wise scales) for the GEMM.
- "auto": "triton" for CUDA tensors of a dtype it takes when triton is installed and the weight's
  format has a Triton kernel (`QuantSpec.kernel`), else "reference".
triton is imported on first use of a Triton backend, never by `import lowbit`.

`hadamard_transform(x, backend, spec)` is the online rotation of a layer that has one
(`reference.hadamard_transform`), on the backend its kernel runs on: the Triton transform
(`lowbit.kernels.triton_hadamard`) where that is a Triton backend and x needs no gradient.
"""

import importlib.util
import os
from functools import cache

import torch

from lowbit.kernels import reference
from lowbit.quantizers import QTensor, QuantSpec, dequantize

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# oldest GPU generation the Triton backend is chosen for automatically (Turing)
MIN_CAPABILITY = (7, 5)


def _triton(x, q, l1, l2, smooth, bias):
    from lowbit.kernels import triton_qlinear

    return triton_qlinear.qlinear(x, q, l1, l2, smooth, bias)


def _triton_w8a8(x, q, l1, l2, smooth, bias):
    from lowbit.kernels import triton_qlinear

    return triton_qlinear.qlinear_w8a8(x, q, l1, l2, smooth, bias)


def _triton_w8a8_scaled_mm(x, q, l1, l2, smooth, bias):
    from lowbit.kernels import triton_qlinear

    return triton_qlinear.qlinear_w8a8_scaled_mm(x, q, l1, l2, smooth, bias)


BACKENDS = {
    "reference": reference.qlinear,
    "triton": _triton,
    "triton_w8a8": _triton_w8a8,
    "triton_w8a8_scaled_mm": _triton_w8a8_scaled_mm,
}


class BackendError(ValueError):
    """A kernel backend name that is not known, or one that cannot run on the given device or dtype."""


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # looked up, not imported


def _triton_runs_on(device: torch.device) -> bool:
    """A CUDA GPU Triton compiles for, or the CPU under Triton's interpreter.

    (torch.compile folds get_device_properties to a constant while tracing a caller.)
    """
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type != "cuda":
        return False
    props = torch.cuda.get_device_properties(device)
    return (props.major, props.minor) >= MIN_CAPABILITY


def resolve_backend(
    backend: str,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    spec: QuantSpec | None = None,
) -> str:
    """The concrete backend for `backend` ("auto" or a key of BACKENDS) for inputs on `device` of `dtype`
    and a weight in `spec`.

    Without a device only the name (and the format) is checked. A Triton backend that cannot run there,
    or for a format without a Triton kernel, raises BackendError.
    """
    reference_only = spec is not None and spec.kernel is None
    if backend == "auto":
        if device is None or device.type != "cuda" or not TRITON_INSTALLED or dtype not in TRITON_DTYPES:
            return "reference"
        return "triton" if _triton_runs_on(device) and not reference_only else "reference"
    if backend not in BACKENDS:
        raise BackendError(f"unknown qlinear backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    if backend != "reference" and reference_only:
        raise BackendError(f"{spec.format} has no Triton kernel; use the reference backend")
    if backend == "reference" or device is None:
        return backend
    if not TRITON_INSTALLED:
        raise BackendError(f"the {backend} backend needs triton, which is not installed")
    if not _triton_runs_on(device):
        raise BackendError(
            f"the {backend} backend runs on CUDA GPUs of compute capability >= 7.5, not {device}; "
            "on the CPU set TRITON_INTERPRET=1 before the kernels are first used (slow, for tests)"
        )
    if dtype is not None and dtype not in TRITON_DTYPES:
        raise BackendError(f"the {backend} backend computes in float16, bfloat16 or float32, got {dtype}")
    return backend


@cache
def _spec(format: str, group_size: int, symmetric: bool, scale_dtype: str, double_quant: bool) -> QuantSpec:
    return QuantSpec(format, group_size or None, symmetric, scale_dtype, double_quant)


def _spec_args(spec: QuantSpec) -> tuple:
    """The spec as plain op arguments (group_size 0 = per-channel)."""
    return spec.format, spec.group_size or 0, spec.symmetric, spec.scale_dtype, spec.double_quant


@torch.library.custom_op("lowbit::qlinear", mutates_args=())
def qlinear_op(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    dq_absmax: torch.Tensor | None,
    l1: torch.Tensor | None,
    l2: torch.Tensor | None,
    smooth: torch.Tensor | None,
    bias: torch.Tensor | None,
    format: str,
    group_size: int,
    symmetric: bool,
    scale_dtype: str,
    double_quant: bool,
    n: int,
    k: int,
    backend: str,
) -> torch.Tensor:
    """The quantized linear over the QTensor's fields and its spec's fields (group_size 0: per-channel)."""
    spec = _spec(format, group_size, symmetric, scale_dtype, double_quant)
    q = QTensor(codes, scales, zeros, dq_absmax, spec, (n, k))
    return BACKENDS[backend](x, q, l1, l2, smooth, bias)


@qlinear_op.register_fake
def _qlinear_fake(x, *rest):
    n = rest[-3]  # the op's arguments end with (..., n, k, backend)
    return x.new_empty((*x.shape[:-1], n))


def _setup_context(ctx, inputs, output) -> None:
    x, codes, scales, zeros, dq_absmax, l1, l2, smooth, bias, *spec, n, k, backend = inputs
    ctx.save_for_backward(x, codes, scales, zeros, dq_absmax, l1, l2, smooth)
    ctx.meta = (_spec(*spec), n, k, None if bias is None else bias.dtype)


def _backward(ctx, g):
    """Gradients of y = x_s W^T + (x_s L2^T) L1^T + b with x_s = x / smooth, W constant."""
    x, codes, scales, zeros, dq_absmax, l1, l2, smooth = ctx.saved_tensors
    spec, n, k, bias_dtype = ctx.meta
    need = ctx.needs_input_grad
    dtype = x.dtype
    g2 = g.reshape(-1, n)  # g2: [M, N]
    x_s = (x if smooth is None else x / smooth.to(dtype)).reshape(-1, k)  # x_s: [M, K]
    gx_s = g2 @ dequantize(QTensor(codes, scales, zeros, dq_absmax, spec, (n, k)), dtype)  # [M, K]
    g_l1 = g_l2 = g_smooth = g_bias = None
    if l1 is not None:
        l1_, l2_ = l1.to(dtype), l2.to(dtype)
        gl = g2 @ l1_  # gl: [M, r]
        gx_s = gx_s + gl @ l2_
        if need[5]:
            g_l1 = (g2.T @ (x_s @ l2_.T)).to(l1.dtype)  # [N, M] @ [M, r]
        if need[6]:
            g_l2 = (gl.T @ x_s).to(l2.dtype)  # [r, M] @ [M, K]
    if smooth is not None and need[7]:
        # d x_s / d smooth = -x / smooth^2 = -x_s / smooth, summed over every row
        g_smooth = (-(gx_s * x_s).sum(0) / smooth.to(dtype)).to(smooth.dtype)
    if need[8]:
        g_bias = g2.sum(0).to(bias_dtype)
    g_x = None
    if need[0]:
        g_x = (gx_s if smooth is None else gx_s / smooth.to(dtype)).reshape(x.shape)
    return (g_x, None, None, None, None, g_l1, g_l2, g_smooth, g_bias) + (None,) * 8


qlinear_op.register_autograd(_backward, setup_context=_setup_context)


def qlinear(
    x: torch.Tensor,
    q: QTensor,
    l1: torch.Tensor | None = None,
    l2: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y [..., N] = (x / smooth) @ dequantize(q).T + ((x / smooth) @ l2.T) @ l1.T + bias with `backend`.

    backend: "auto" (the fastest exact backend for x's device and dtype) or a key of BACKENDS.
    """
    reference.check_inputs(x, q, l1, l2, smooth, bias)
    name = resolve_backend(backend, x.device, x.dtype, q.spec)
    if q.extra:  # a format family's own tensors (`QTensor.extra`): the reference reads them, the op does not
        return reference.qlinear(x, q, l1, l2, smooth, bias)
    n, k = q.shape
    fields = (q.codes, q.scales, q.zeros, q.dq_absmax)
    return qlinear_op(x, *fields, l1, l2, smooth, bias, *_spec_args(q.spec), n, k, name)


def hadamard_transform(x: torch.Tensor, backend: str = "auto", spec: QuantSpec | None = None) -> torch.Tensor:
    """x R [..., K] (`reference.hadamard_transform`) on the backend `backend` resolves to for x and `spec`."""
    name = resolve_backend(backend, x.device, x.dtype, spec)
    if name == "reference" or (torch.is_grad_enabled() and x.requires_grad):
        return reference.hadamard_transform(x)
    from lowbit.kernels import triton_hadamard

    return triton_hadamard.hadamard_transform(x)
