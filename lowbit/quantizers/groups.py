"""Group layout of a weight matrix and how group scales are stored.

Layout: W [N, K] is split along K into G = ceil(K / gs) groups per row, gs = spec.group_size or K
(per-channel). Group g of row n covers columns [g * gs, min((g + 1) * gs, K)); when K % gs != 0 the
last group is shorter. Statistics of a group (absmax, min, max) use only its real columns
(`group_reduce` reduces the ragged last group on its own); the zero-padded view returned by
`group_view` carries a mask of the real columns.

Scale storage: a scale s [N, G] is stored either in spec.scale_dtype, or, with spec.double_quant,
as QLoRA's double quantization (Dettmers et al. 2023, "QLoRA", section 3) in the simple unsigned
form this library uses: the flattened scales are cut into blocks of DQ_BLOCK, each block keeps its
fp32 max m_b, and each scale becomes an 8-bit code c = round(s / m_b * 255), read back as
s_hat = m_b * (c / 255). Codes are kept >= 1 so no scale is ever read back as 0. The round trip is
idempotent: the block max is stored exactly (its code is 255), so re-quantizing s_hat gives the same
codes and maxima. `round_scales` applies the storage round trip; every format computes its codes
against the rounded scales, so `dequantize` uses exactly the scales the codes were chosen for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: the spec's module reads the format families, which read this one
    from lowbit.quantizers.spec import QuantSpec

SCALE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}

# Second-level (double) quantization of block scales, QLoRA section 3: 8-bit codes for the scales,
# one fp32 absmax per block of DQ_BLOCK scales.
DQ_BLOCK = 256
DQ_LEVELS = 255


def effective_group_size(spec: QuantSpec, in_features: int) -> int:
    """Columns per group for K = in_features: spec.group_size, or K when per-channel (or gs > K)."""
    return min(spec.group_size or in_features, in_features)


def group_view(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split W [N, K] into groups: returns (wg [N, G, gs], mask bool [G, gs]).

    wg is a view of w when K % gs == 0, else a zero-padded copy; mask is True on real columns.
    """
    n, k = w.shape
    g = -(-k // group_size)
    pad = g * group_size - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    mask = torch.arange(g * group_size, device=w.device).view(g, group_size) < k
    return w.view(n, g, group_size), mask


def from_group_view(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `group_view`: wg [N, G, gs] -> W [N, K], padding dropped."""
    n, g, gs = wg.shape
    return wg.reshape(n, g * gs)[:, :in_features]


def expand_groups(s: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Broadcast a per-group tensor s [N, G] to every column: [N, K]."""
    return s.repeat_interleave(group_size, dim=1)[:, :in_features]


def group_reduce(w: torch.Tensor, group_size: int, reduce: Callable[..., torch.Tensor]) -> torch.Tensor:
    """reduce(x, dim=...) over the real columns of every group of W [N, K]: float32 [N, G].

    Full groups are reduced as one [N, K // gs, gs] view, the ragged last group on its own, so no
    padding ever enters a statistic.
    """
    n, k = w.shape
    full = k // group_size
    parts = []
    if full:
        parts.append(reduce(w[:, : full * group_size].reshape(n, full, group_size), dim=2))
    if k % group_size:
        parts.append(reduce(w[:, full * group_size :], dim=1, keepdim=True))
    return torch.cat(parts, dim=1).float() if len(parts) > 1 else parts[0].float()


def group_absmax(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """max |w| over the real columns of each group: [N, G] float32."""
    return group_reduce(w.abs(), group_size, torch.amax)


def group_minmax(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) over the real columns of each group, each [N, G] float32."""
    return group_reduce(w, group_size, torch.amin), group_reduce(w, group_size, torch.amax)


def _dq_blocks(s: torch.Tensor) -> torch.Tensor:
    """Flattened scales s [N, G] padded with zeros to blocks: [B, DQ_BLOCK]."""
    flat = s.reshape(-1)
    pad = -flat.numel() % DQ_BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, DQ_BLOCK)


def dq_encode(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Double-quantize positive scales s [N, G]: (codes uint8 [N, G], dq_absmax float32 [B])."""
    blocks = _dq_blocks(s.float())  # [B, DQ_BLOCK]
    m = blocks.amax(dim=1)  # [B]
    c = torch.round(blocks / m[:, None] * DQ_LEVELS).clamp_(1, DQ_LEVELS)
    return c.reshape(-1)[: s.numel()].view(s.shape).to(torch.uint8), m


def dq_decode(codes: torch.Tensor, dq_absmax: torch.Tensor) -> torch.Tensor:
    """Scales from double-quantization codes [N, G] and block maxima [B]: float32 [N, G]."""
    n, g = codes.shape
    blocks = _dq_blocks(codes.float())  # [B, DQ_BLOCK]
    s = dq_absmax.float()[:, None] * (blocks / DQ_LEVELS)
    return s.reshape(-1)[: n * g].view(n, g)


def _scale_range(spec: QuantSpec) -> tuple[float, float]:
    """Smallest and largest positive scale the storage can hold (fp32 when double-quantized)."""
    dtype = torch.float32 if spec.double_quant else SCALE_DTYPES[spec.scale_dtype]
    info = torch.finfo(dtype)
    smallest = info.smallest_normal if dtype == torch.float32 else info.smallest_normal * info.eps
    return smallest, info.max


def round_scales(s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Positive raw scales s [N, G] -> float32 [N, G], exactly as they will be read back from storage.

    Scales are first clamped into the storage dtype's positive range, so an all-zero group gets a
    tiny positive scale (codes stay finite) instead of 0.
    """
    lo, hi = _scale_range(spec)
    s = s.float().clamp(lo, hi)
    if spec.double_quant:
        return dq_decode(*dq_encode(s))
    return s.to(SCALE_DTYPES[spec.scale_dtype]).float()


def store_scales(s: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales s [N, G] -> (stored scales [N, G], dq_absmax [B] or None), as a QTensor holds them.

    Exact (no further rounding) when s came from `round_scales`.
    """
    if spec.double_quant:
        return dq_encode(s)
    return s.to(SCALE_DTYPES[spec.scale_dtype]), None


def load_scales(scales: torch.Tensor, dq_absmax: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Stored scales (and block maxima) -> float32 [N, G]."""
    if spec.double_quant:
        if dq_absmax is None:
            raise ValueError("double-quantized scales need dq_absmax")
        return dq_decode(scales, dq_absmax)
    return scales.float()


def absmax_scales(w: torch.Tensor, spec: QuantSpec, qmax: float) -> torch.Tensor:
    """Symmetric scale s = absmax / qmax per group, rounded to its storage: float32 [N, G]."""
    gs = effective_group_size(spec, w.shape[1])
    return round_scales(group_absmax(w, gs) / qmax, spec)
