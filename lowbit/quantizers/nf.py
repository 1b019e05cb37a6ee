"""NormalFloat formats NF2/NF3/NF4 (Dettmers et al. 2023, "QLoRA", section 3 and appendix E).

The k-bit codebook holds quantiles of N(0, 1), built as bitsandbytes' `create_normal_map` does:
2^(k-1) positive quantiles norm.ppf(linspace(offset, 0.5, 2^(k-1) + 1)[:-1]), 2^(k-1) - 1 negative
ones -norm.ppf(linspace(offset, 0.5, 2^(k-1))[:-1]), and an exact zero; normalised by the largest
value to [-1, 1] and sorted ascending, so code c means codebook[c]. The offset
0.5 * ((1 - 1 / (2 * (2^k - 1))) + (1 - 1 / (2 * 2^k))) is the mean of the two tail probabilities
QLoRA uses for its asymmetric grid (0.9677 for k = 4).

A group is scaled by its absmax, s = absmax (rounded to its storage), and each weight takes the
nearest codebook value of w / s: c = argmin_j |w / s - codebook[j]|, w_hat = s * codebook[c].
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from lowbit.quantizers.family import Family, positive_entries
from lowbit.quantizers.groups import absmax_scales, effective_group_size, expand_groups

if TYPE_CHECKING:  # annotations only: the spec's module reads this family
    from lowbit.quantizers.spec import QuantSpec


def nf_offset(bits: int) -> float:
    """QLoRA's outermost quantile probability for a k-bit NormalFloat grid."""
    n = 1 << bits
    return 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))


@cache
def _nf_values(bits: int) -> tuple[float, ...]:
    from scipy.stats import norm  # deferred: scipy.stats takes seconds to import and only NF needs it

    half = 1 << (bits - 1)
    offset = nf_offset(bits)
    positive = norm.ppf(np.linspace(offset, 0.5, half + 1)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, half)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    return tuple(float(v) for v in values / values.max())


def nf_codebook(bits: int) -> torch.Tensor:
    """NormalFloat codebook of 2^bits values in [-1, 1], ascending: float32 [2^bits]."""
    if bits < 2 or bits > 8:
        raise ValueError(f"NormalFloat needs 2..8 bits, got {bits}")
    return torch.tensor(_nf_values(bits), dtype=torch.float32)


def nearest_index(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of ascending `values` [V] for every element of x (ties go down).

    The index is the number of midpoints strictly below x. For up to 16 values a sum of comparisons
    is about twice as fast on CPU as torch.bucketize's binary search; larger codebooks use bucketize.
    Returns an integer tensor shaped like x (uint8 for up to 16 values, else int64).
    """
    mid = (values[1:] + values[:-1]) / 2  # [V - 1] decision boundaries
    if len(values) > 16:
        return torch.bucketize(x, mid.to(x.device, x.dtype))
    index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for m in mid.tolist():
        index += x > m
    return index


def fit_scales(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, None]:
    """Absmax scales s [N, G] as stored; NormalFloat has no zero point."""
    return absmax_scales(w, spec, 1.0), None


def encode(w: torch.Tensor, s: torch.Tensor, z: None, spec: QuantSpec) -> torch.Tensor:
    """Codes uint8 [N, K]: the nearest codebook entry of w / s."""
    k = w.shape[1]
    x = w.float() / expand_groups(s, k, effective_group_size(spec, k))  # [N, K], in [-1, 1]
    return nearest_index(x, nf_codebook(spec.bits)).to(torch.uint8)


def decode(codes: torch.Tensor, s: torch.Tensor, z: None, spec: QuantSpec) -> torch.Tensor:
    """w_hat float32 [N, K] = s * codebook[c]."""
    k = codes.shape[1]
    values = nf_codebook(spec.bits).to(codes.device)[codes.long()]  # [N, K]
    return expand_groups(s, k, effective_group_size(spec, k)) * values


def inside(v: torch.Tensor, z: None, spec: QuantSpec) -> torch.Tensor:
    """|v| <= 1: the codebook spans [-1, 1] of the absmax scale."""
    return v.abs() <= 1.0


def positive_levels(spec: QuantSpec) -> int:
    """Q_P: the codebook's positive entries, 2^(b-1)."""
    return positive_entries(nf_codebook(spec.bits))


NORMALFLOAT = Family(
    "nf", fit_scales, encode, decode, inside, positive_levels, codebook=lambda fmt, bits: nf_codebook(bits)
)
