"""Minifloat formats: FP8 E4M3 / E5M2 and FP4 E2M1 with per-group (or per-channel) scales.

FP8 (Micikevicius et al. 2022, "FP8 Formats for Deep Learning"): s = absmax / fmax with fmax = 448
(E4M3, torch.float8_e4m3fn) or 57344 (E5M2); w / s is clamped to [-fmax, fmax] (saturating: the scale
is rounded to its storage first, so w / s may exceed fmax slightly) and cast with torch's
round-to-nearest-even; the code is the raw float8 bit pattern, w_hat = s * float(code as float8).

FP4 E2M1 (Wu et al. 2023, "ZeroQuant-FP"): magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}, code =
sign << 3 | index; s = absmax / 6 and each weight takes the nearest magnitude of |w| / s (ties go to
the smaller one). A code's value is fp_codebook("fp4_e2m1")[code]; code 8 (negative zero) is never
produced.

Scale range: E5M2's fmax of 57344 puts s = absmax / fmax below float16's normal range once a group's
absmax is under about 3.5; for weights much smaller than that (absmax < 0.05) the subnormal float16
scale costs E5M2 up to a few dB: use bfloat16 or float32 scales there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowbit.quantizers.family import Family, positive_entries
from lowbit.quantizers.groups import absmax_scales, effective_group_size, expand_groups
from lowbit.quantizers.nf import nearest_index

if TYPE_CHECKING:  # annotations only: the spec's module reads this family
    from lowbit.quantizers.spec import QuantSpec

FP8_DTYPES: dict[str, torch.dtype] = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def fmax(format: str) -> float:
    """Largest finite value of a minifloat format."""
    if format in FP8_DTYPES:
        return float(torch.finfo(FP8_DTYPES[format]).max)
    if format == "fp4_e2m1":
        return E2M1_MAGNITUDES[-1]
    raise ValueError(f"{format!r} is not a minifloat format")


def fp_codebook(format: str) -> torch.Tensor:
    """Value of every code of a minifloat format: float32 [2^bits] (FP8: NaN at its NaN bit patterns)."""
    if format in FP8_DTYPES:
        return torch.arange(256, dtype=torch.uint8).view(FP8_DTYPES[format]).float()
    if format == "fp4_e2m1":
        m = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32)
        return torch.cat([m, -m])
    raise ValueError(f"{format!r} is not a minifloat format")


def fit_scales(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, None]:
    """Scales s = absmax / fmax per group [N, G], as stored; no zero point."""
    return absmax_scales(w, spec, fmax(spec.format)), None


def encode(w: torch.Tensor, s: torch.Tensor, z: None, spec: QuantSpec) -> torch.Tensor:
    """Codes uint8 [N, K]: float8 bit patterns, or E2M1 sign/index nibbles, of w / s."""
    k = w.shape[1]
    x = w.float() / expand_groups(s, k, effective_group_size(spec, k))  # [N, K]
    if spec.format in FP8_DTYPES:
        top = fmax(spec.format)
        return x.clamp_(-top, top).to(FP8_DTYPES[spec.format]).view(torch.uint8)
    magnitudes = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=x.device)
    index = nearest_index(x.abs(), magnitudes).to(torch.uint8)  # [N, K] in 0..7
    sign = ((x < 0) & (index > 0)).to(torch.uint8)
    return sign << 3 | index


def decode(codes: torch.Tensor, s: torch.Tensor, z: None, spec: QuantSpec) -> torch.Tensor:
    """w_hat float32 [N, K] = s * value(code)."""
    k = codes.shape[1]
    if spec.format in FP8_DTYPES:
        values = codes.view(FP8_DTYPES[spec.format]).float()
    else:
        values = fp_codebook(spec.format).to(codes.device)[codes.long()]
    return expand_groups(s, k, effective_group_size(spec, k)) * values


def inside(v: torch.Tensor, z: None, spec: QuantSpec) -> torch.Tensor:
    """|v| <= fmax: encode saturates beyond the format's largest finite value."""
    return v.abs() <= fmax(spec.format)


def positive_levels(spec: QuantSpec) -> int:
    """Q_P: the positive finite values of the format (FP8 E4M3: 126, its NaN pattern left out)."""
    return positive_entries(fp_codebook(spec.format))


MINIFLOAT = Family(
    "fp", fit_scales, encode, decode, inside, positive_levels, codebook=lambda fmt, bits: fp_codebook(fmt)
)
