"""The reference quantized linear: the definition every faster kernel is tested against.

For a weight stored as W diag(smooth) ~ Q + L1 L2, where `smooth` [K] is the optional per-input-channel
smoothing vector of SVDQuant (Li et al. 2024, "SVDQuant: Absorbing Outliers by Low-Rank Components for
4-Bit Diffusion Models": outliers migrate from the input x diag(smooth)^-1 to the weight), the layer is

    x_s = x / smooth
    y   = x_s @ dequantize(Q).T + (x_s @ L2.T) @ L1.T + bias

Everything is computed in x.dtype; Q is dequantized straight to x.dtype.

A layer with an online Hadamard transform (QuaRot's online rotation before down_proj, Ashkboos et al.
2024, sec. 4.2) stores W R and multiplies its input by R first, x <- x R, with R = `online_matrix(K)`
(`lowbit.quantizers.hadamard`): `hadamard_transform` below is that product, the definition every
backend applies before the layer above.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from lowbit.quantizers import QTensor, dequantize
from lowbit.quantizers.hadamard import hadamard, online_orders


class KernelInputError(ValueError):
    """Inputs of a quantized linear that do not fit together (shapes, missing factor, dtype)."""


def check_inputs(
    x: torch.Tensor,
    q: QTensor,
    l1: torch.Tensor | None,
    l2: torch.Tensor | None,
    smooth: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> None:
    """Raise KernelInputError unless x [..., K], l1 [N, r], l2 [r, K], smooth [K], bias [N] fit q [N, K]."""
    N, K = q.shape
    if not x.is_floating_point():
        raise KernelInputError(f"qlinear input must be floating point, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise KernelInputError(f"qlinear input has {tuple(x.shape)[-1:]} features, the weight expects {K}")
    if (l1 is None) != (l2 is None):
        raise KernelInputError("qlinear needs both low-rank factors l1 and l2, or neither")
    if l1 is not None:
        r = l1.shape[-1]
        if l1.dim() != 2 or l2.dim() != 2 or l1.shape[0] != N or tuple(l2.shape) != (r, K):
            raise KernelInputError(
                f"low-rank factors l1 {tuple(l1.shape)} and l2 {tuple(l2.shape)} do not fit "
                f"[{N}, r] and [r, {K}]"
            )
    if smooth is not None and tuple(smooth.shape) != (K,):
        raise KernelInputError(f"smoothing vector has shape {tuple(smooth.shape)}, expected ({K},)")
    if bias is not None and tuple(bias.shape) != (N,):
        raise KernelInputError(f"bias has shape {tuple(bias.shape)}, expected ({N},)")


def qlinear(
    x: torch.Tensor,
    q: QTensor,
    l1: torch.Tensor | None = None,
    l2: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [..., N] = (x / smooth) @ dequantize(q).T + ((x / smooth) @ l2.T) @ l1.T + bias, for x [..., K]."""
    check_inputs(x, q, l1, l2, smooth, bias)
    return linear_dequantized(x, dequantize(q, x.dtype), l1, l2, smooth, bias)


def linear_dequantized(
    x: torch.Tensor,
    w: torch.Tensor,
    l1: torch.Tensor | None = None,
    l2: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`qlinear` with the weight already dequantized: w = dequantize(q, x.dtype) [N, K]."""
    dtype = x.dtype
    x_s = x if smooth is None else x / smooth.to(dtype)  # x_s: [..., K]
    y = x_s @ w.T  # y: [..., N]
    if l1 is not None:
        y = y + (x_s @ l2.to(dtype).T) @ l1.to(dtype).T  # [..., r] @ [r, N]
    if bias is not None:
        y = y + bias.to(dtype)
    return y


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x R [..., n] for x [..., n], R = (H_m (x) H_p) / sqrt(n) = `online_matrix(n)`, in x.dtype.

    The fast Walsh-Hadamard transform (O(n log p)) of each row's p-sized part, then the dense H_m over its
    m parts: with X = x as [m, p], x (A (x) B) = A^T X B, and H_p = H_2 (x) ... (x) H_2 is one butterfly
    (a + b, a - b) along each of its log2 p index bits.
    """
    n = x.shape[-1]
    m, p = online_orders(n)
    y = x.reshape(-1, m, p)  # y: [M, m, p]
    h = 1
    while h < p:
        y = y.reshape(-1, m, p // (2 * h), 2, h)  # the bit of weight h as axis -2
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    y = y.reshape(-1, m, p)
    if m > 1:
        y = torch.einsum("bip,ik->bkp", y, _dense(m).to(device=x.device, dtype=x.dtype))  # H_m^T X
    return (y * n**-0.5).reshape(x.shape)


@lru_cache(maxsize=8)
def _dense(m: int) -> torch.Tensor:
    """H_m [m, m] (float64), built once per order (Paley's construction loops in Python)."""
    return hadamard(m)
