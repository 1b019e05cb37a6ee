"""The reference quantized linear: the definition every faster kernel is tested against.

For a weight stored as W diag(smooth) ~ Q + L1 L2, where `smooth` [K] is the optional per-input-channel
smoothing vector of SVDQuant (Li et al. 2024, "SVDQuant: Absorbing Outliers by Low-Rank Components for
4-Bit Diffusion Models": outliers migrate from the input x diag(smooth)^-1 to the weight), the layer is

    x_s = x / smooth
    y   = x_s @ dequantize(Q).T + (x_s @ L2.T) @ L1.T + bias

Everything is computed in x.dtype; Q is dequantized straight to x.dtype.
"""

from __future__ import annotations

import torch

from lowbit.quantizers import QTensor, dequantize


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
