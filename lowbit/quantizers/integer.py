"""Uniform integer formats INT2/3/4/8, symmetric and asymmetric, group-wise (round to nearest).

The b-bit affine grid of GPTQ (Frantar et al. 2023, "GPTQ", its `quantize`: q = clamp(round(w / s) + z))
with per-group statistics:

asymmetric: s = (max - min) / (2^b - 1),  z = clamp(round(-min / s), 0, 2^b - 1),
            c = clamp(round(w / s) + z, 0, 2^b - 1),        w_hat = s * (c - z);
symmetric:  s = absmax / (2^(b-1) - 1),
            c = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1) + 2^(b-1),  w_hat = s * (c - 2^(b-1)).

min and max are those of the group's real columns, extended to include 0 (GPTQ's convention): 0 is
then exactly representable and the zero point needs no clamping except at rounding ties. s is rounded
to its storage (scale dtype or double quantization) before z and c are computed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowbit.quantizers.family import Family, Side
from lowbit.quantizers.groups import (
    absmax_scales,
    effective_group_size,
    expand_groups,
    group_minmax,
    round_scales,
)

if TYPE_CHECKING:  # annotations only: the spec's module reads this family
    from lowbit.quantizers.spec import QuantSpec


def _levels(spec: QuantSpec) -> tuple[int, int]:
    """(qmax, half): largest code 2^b - 1 and the symmetric offset 2^(b-1)."""
    return (1 << spec.bits) - 1, 1 << (spec.bits - 1)


def fit_scales(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales s [N, G] (as stored) and, if asymmetric, integer zero points z [N, G] (float32)."""
    qmax, half = _levels(spec)
    if spec.symmetric:
        return absmax_scales(w, spec, half - 1), None
    lo, hi = group_minmax(w, effective_group_size(spec, w.shape[1]))  # [N, G] each
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    s = round_scales((hi - lo) / qmax, spec)
    z = torch.round(-lo / s).clamp_(0, qmax)
    return s, z


def encode(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Codes uint8 [N, K] of w [N, K] against scales s [N, G] (and zeros z [N, G])."""
    k = w.shape[1]
    gs = effective_group_size(spec, k)
    qmax, half = _levels(spec)
    x = w.float() / expand_groups(s, k, gs)  # [N, K]
    if spec.symmetric:
        return (torch.round(x).clamp_(-half, half - 1) + half).to(torch.uint8)
    return (torch.round(x) + expand_groups(z, k, gs)).clamp_(0, qmax).to(torch.uint8)


def decode(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """w_hat float32 [N, K] from codes uint8 [N, K], scales s [N, G] and zeros z [N, G]."""
    k = codes.shape[1]
    gs = effective_group_size(spec, k)
    _, half = _levels(spec)
    w = codes.float().sub_(half if spec.symmetric else expand_groups(z, k, gs))  # c - offset
    scale = expand_groups(s, k, gs)
    # the same products either way; in place, two fp32 [N, K] at most (Llama-3-8B's gate_proj: 0.23 GB each)
    return scale * w if scale.requires_grad else w.mul_(scale)


def inside(v: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Where round(v) [N, K] (+ z) lies on the grid 0 .. 2^b - 1 (symmetric: -2^(b-1) .. 2^(b-1) - 1)."""
    qmax, half = _levels(spec)
    if z is None:
        return (torch.round(v) >= -half) & (torch.round(v) <= half - 1)
    u = torch.round(v) + expand_groups(z, v.shape[1], effective_group_size(spec, v.shape[1]))
    return (u >= 0) & (u <= qmax)


def positive_levels(spec: QuantSpec) -> int:
    """Q_P: 2^b - 1 (asymmetric), 2^(b-1) - 1 (symmetric)."""
    qmax, half = _levels(spec)
    return half - 1 if spec.symmetric else qmax


def side_gradient(codes: torch.Tensor, z: torch.Tensor, inside: torch.Tensor, spec: QuantSpec):
    """LSQ+'s learned offset: w_hat / s = c - z moves with z only where v is clamped (inside, c follows z)."""
    k = codes.shape[1]
    return -(1 - inside) * expand_groups(z, k, effective_group_size(spec, k))


def stored_zeros(z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """z [N, G] rounded to integers in [0, 2^b - 1], as a b-bit zero point stores it."""
    return torch.round(z).clamp(0, _levels(spec)[0])


# b-bit zero points, packed like codes: int4-g32 with double-quantized scales costs
# 4 + 8.125 / 32 + 4 / 32 = 4.379 bits per weight, not 4.504 as with a byte per zero point
ZERO_POINTS = Side(
    "zeros", "zero points", lambda spec: (), torch.uint8, stored_zeros, "integers in [0, 2^b - 1]",
    packed=True,
)  # fmt: skip

INTEGER = Family(
    "int", fit_scales, encode, decode, inside, positive_levels, ZERO_POINTS,
    symmetric_variant=True, side_gradient=side_gradient,
)  # fmt: skip
