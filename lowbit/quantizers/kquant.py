"""llama.cpp's K-quants Q4_K, Q5_K and Q6_K (ggml, ggml-quants.c: quantize_row_q{4,5,6}_K_ref and
dequantize_row_q{4,5,6}_K), stored so that a GGUF file holds them bit for bit.

A row is cut into super-blocks of QK_K = 256 weights (the group, s [N, G] = the super-block's fp16 d),
each cut into sub-blocks with their own small integer scale:

    Q4_K / Q5_K: 8 sub-blocks of 32, 6-bit scale sc and 6-bit min m each, fp16 d and dmin per super-block:
                 w_hat = (d sc) c - (dmin m),  c in 0 .. 15 (Q4_K) or 0 .. 31 (Q5_K)
    Q6_K:        16 sub-blocks of 16, int8 scale sc each, fp16 d per super-block:
                 w_hat = (d sc) (c - 32),      c in 0 .. 63

The side tensor `kscales` [N, G, B] uint8 holds the rest of each super-block's scales as ggml's block
stores them: Q4_K / Q5_K the fp16 bytes of dmin, then the 12 bytes packing the eight 6-bit (sc, m)
(`get_scale_min_k4`), B = 14; Q6_K the 16 int8 scales as bytes, B = 16. Bits per weight, scales included:
Q4_K 4.5, Q5_K 5.5, Q6_K 6.5625, exactly llama.cpp's. A ragged last super-block (K % 256 != 0) is fitted
zero-padded; llama.cpp itself needs K % 256 == 0 (`lowbit.quantizers.engines`).

The fit follows ggml's reference quantizer: per sub-block, Q4_K / Q5_K search the scale and min by
weighted least squares over a sweep of trial scales (make_qkx2_quants, weights av_x + |x|), Q6_K the
scale with the asymmetric end -32 (make_qx_quants, weights x^2); the sub-block scales are then rounded
against d = max / 63 (mins against dmin) or, for Q6_K, against d = max / 128, and every weight is encoded
to the nearest code under its sub-block's stored d sc and dmin m. One deviation: lowbit's scales are
positive, so where ggml would store a negative Q6_K d (its largest sub-block scale positive) d is that
scale / 127 instead of -scale / 128. Values depend on a column's place in its super-block (`storage`):
GPTQ codes a column under the super-block's scales rolled to put its sub-block first (`at_column`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lowbit.quantizers.family import Family, Side
from lowbit.quantizers.groups import round_scales

if TYPE_CHECKING:  # annotations only: the spec's module reads this family
    from lowbit.quantizers.spec import QuantSpec

QK_K = 256  # weights per super-block
GROUP_MAX_EPS = 1e-15  # ggml's all-zero threshold


class KQuantError(ValueError):
    """What lowbit does not do with a K-quant format (fake quantization of q4_k / q5_k)."""


@dataclass(frozen=True)
class KType:
    """One K-quant: sub-block size, largest code, whether sub-blocks have mins, side bytes per
    super-block, and make_qkx2_quants's sweep (rmin, rdelta, nstep) for the types with mins."""

    sub: int
    nmax: int
    mins: bool
    side_bytes: int
    sweep: tuple[float, float, int] = (0.0, 0.0, 0)


KTYPES = {
    "q4_k": KType(32, 15, True, 14, (-1.0, 0.1, 20)),
    "q5_k": KType(32, 31, True, 14, (-0.5, 0.1, 15)),
    "q6_k": KType(16, 63, False, 16),
}


def _superblocks(w: torch.Tensor, sub: int) -> torch.Tensor:
    """W [N, K] zero-padded to whole super-blocks: [N, G, 256 / sub, sub]."""
    n, k = w.shape
    pad = -k % QK_K
    return torch.nn.functional.pad(w.float(), (0, pad)).view(n, -1, QK_K // sub, sub)


def qkx2_scale_min(x: torch.Tensor, weights: torch.Tensor, nmax: int, sweep) -> tuple:
    """ggml's make_qkx2_quants over sub-blocks x [..., n]: (scale, the_min) [...], x ~ scale l - the_min
    with l in 0..nmax, minimising the weighted squared error over trial scales (nmax + rmin + i rdelta)
    / (max - min), i = 0..nstep, each refined by least squares for (scale, min), min kept <= 0."""
    rmin, rdelta, nstep = sweep
    lo = x.amin(-1).clamp(max=0.0)
    hi = x.amax(-1)
    flat = hi == lo
    sum_w, sum_x = weights.sum(-1), (weights * x).sum(-1)

    def codes(iscale, lo):
        return torch.round(iscale[..., None] * (x - lo[..., None])).clamp_(0, nmax)

    def error(scale, lo, l):
        return (weights * (scale[..., None] * l + lo[..., None] - x).square()).sum(-1)

    span = torch.where(flat, 1.0, hi - lo)
    scale = span / nmax
    best = error(scale, lo, codes(nmax / span, lo))
    for i in range(nstep + 1):
        l = codes((rmin + rdelta * i + nmax) / torch.where(flat, 1.0, hi - lo), lo)
        sl, sl2, sxl = (weights * l).sum(-1), (weights * l * l).sum(-1), (weights * l * x).sum(-1)
        D = sum_w * sl2 - sl * sl
        ok = D > 0
        D = torch.where(ok, D, 1.0)
        this_scale = (sum_w * sxl - sum_x * sl) / D
        this_min = (sl2 * sum_x - sl * sxl) / D
        positive = this_min > 0
        this_scale = torch.where(positive, sxl / torch.where(sl2 > 0, sl2, 1.0), this_scale)
        this_min = torch.where(positive, 0.0, this_min)
        err = error(this_scale, this_min, l)
        better = ok & (err < best)
        best, scale, lo = (
            torch.where(better, err, best),
            torch.where(better, this_scale, scale),
            torch.where(better, this_min, lo),
        )
    return torch.where(flat, 0.0, scale), -lo


def qx_scale(x: torch.Tensor, nmax: int) -> torch.Tensor:
    """ggml's make_qx_quants (rmse_type 1) over sub-blocks x [..., n]: the signed scale [...] with x ~
    scale l, l in -nmax..nmax-1, the largest |x| at -nmax; trial scales (nmax + 0.1 i) / max,
    i = -9..9, each refined by least squares weighted by x^2."""
    amax, where = x.abs().max(-1)
    top = x.gather(-1, where[..., None])[..., 0]  # the signed value of largest magnitude
    zero = amax < GROUP_MAX_EPS
    top = torch.where(zero, 1.0, top)
    w = x * x

    def sums(iscale):
        l = torch.round(iscale[..., None] * x).clamp_(-nmax, nmax - 1)
        return (w * x * l).sum(-1), (w * l * l).sum(-1)

    sumlx, suml2 = sums(-nmax / top)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for i in (*range(-9, 0), *range(1, 10)):
        sumlx, suml2 = sums(-(nmax + 0.1 * i) / top)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, sumlx / torch.where(suml2 > 0, suml2, 1.0), scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, 0.0, scale)


def pack_scales_mins(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit (sc, m) [..., 8] -> ggml's 12 bytes [..., 12] (the inverse of get_scale_min_k4)."""
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    low = sc[..., :4] | (sc[..., 4:] >> 4) << 6
    mid = m[..., :4] | (m[..., 4:] >> 4) << 6
    high = (sc[..., 4:] & 0xF) | (m[..., 4:] & 0xF) << 4
    return torch.cat([low, mid, high], dim=-1)


def unpack_scales_mins(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's get_scale_min_k4: 12 bytes [..., 12] uint8 -> (sc, m) [..., 8] float32."""
    b0, b1, b2 = b[..., :4], b[..., 4:8], b[..., 8:]
    sc = torch.cat([b0 & 63, (b2 & 0xF) | (b0 >> 6) << 4], dim=-1)
    m = torch.cat([b1 & 63, (b2 >> 4) | (b1 >> 6) << 4], dim=-1)
    return sc.float(), m.float()


def sub_params(s: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sub-block's stored step d sc and offset dmin m (0 for Q6_K): float32 [N, G, 256 / sub]."""
    kt = KTYPES[spec.format]
    b = z.to(torch.uint8)
    if kt.mins:
        dmin = b[..., :2].contiguous().view(torch.float16).float()  # [N, G, 1]
        sc, m = unpack_scales_mins(b[..., 2:])
        return s[..., None] * sc, dmin * m
    sc = b.view(torch.int8).float()  # [N, G, 16]
    return s[..., None] * sc, torch.zeros_like(sc)


def _columns(t: torch.Tensor, k: int, sub: int) -> torch.Tensor:
    """Per-sub-block values [N, G, 256 / sub] on every column: [N, K]."""
    return t.reshape(t.shape[0], -1)[:, : -(-k // sub)].repeat_interleave(sub, dim=1)[:, :k]


def fit_scales(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(s = d float32 [N, G] as stored, kscales float32 [N, G, B] of byte values)."""
    kt = KTYPES[spec.format]
    x = _superblocks(w, kt.sub)  # [N, G, S, sub]
    if kt.mins:
        av_x = x.square().mean(-1, keepdim=True).sqrt()
        scale, the_min = qkx2_scale_min(x, av_x + x.abs(), kt.nmax, kt.sweep)  # [N, G, S]
        max_scale, max_min = scale.amax(-1), the_min.amax(-1)  # [N, G]
        sc = torch.round(scale * torch.where(max_scale > 0, 63 / max_scale, 0.0)[..., None]).clamp_(0, 63)
        m = torch.round(the_min * torch.where(max_min > 0, 63 / max_min, 0.0)[..., None]).clamp_(0, 63)
        dmin = (max_min / 63).clamp(max=torch.finfo(torch.float16).max).to(torch.float16)
        side = torch.cat([dmin[..., None].view(torch.uint8), pack_scales_mins(sc, m)], dim=-1)
        return round_scales(max_scale / 63, spec), side.float()
    scale = qx_scale(x, 32)  # [N, G, 16]
    amax, where = scale.abs().max(-1)
    top = scale.gather(-1, where[..., None])[..., 0]
    zero = amax < GROUP_MAX_EPS
    iscale = torch.where(zero, 0.0, torch.where(top < 0, -128 / top, 127 / torch.where(zero, 1.0, top)))
    sc = torch.round(scale * iscale[..., None]).clamp_(-128, 127)
    d = torch.where(zero, 0.0, 1 / torch.where(zero, 1.0, iscale))
    return round_scales(d, spec), sc.to(torch.int8).view(torch.uint8).float()


def encode(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes uint8 [N, K]: the nearest code of each weight under its sub-block's stored d sc and dmin m."""
    kt = KTYPES[spec.format]
    k = w.shape[1]
    step, offset = (_columns(t, k, kt.sub) for t in sub_params(s, z, spec))  # [N, K] each
    nonzero = step != 0
    safe = torch.where(nonzero, step, 1.0)
    if kt.mins:
        c = torch.round((w.float() + offset) / safe).clamp_(0, kt.nmax)
        return torch.where(nonzero, c, 0.0).to(torch.uint8)
    c = torch.round(w.float() / safe).clamp_(-32, 31) + 32
    return torch.where(nonzero, c, 32.0).to(torch.uint8)


def decode(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """w_hat float32 [N, K] = (d sc) c - dmin m, or (d sc) (c - 32) for Q6_K, in ggml's order of
    operations."""
    kt = KTYPES[spec.format]
    k = codes.shape[1]
    step, offset = (_columns(t, k, kt.sub) for t in sub_params(s, z, spec))
    if kt.mins:
        return step * codes.float() - offset
    return step * (codes.float() - 32)


def inside(v: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Where v [N, K] = w / d is not clamped by encode. Q6_K: round(v / sc) in -32..31 (sc != 0); Q4_K /
    Q5_K need dmin / d, which v and z do not give: fake quantization refuses them."""
    kt = KTYPES[spec.format]
    if kt.mins:
        raise KQuantError(f"fake quantization (fine-tuning) does not support {spec.format}")
    sc = _columns(sub_params(torch.ones(z.shape[:2]), z, spec)[0], v.shape[1], kt.sub)
    u = torch.round(v / torch.where(sc != 0, sc, 1.0))
    return (sc != 0) & (u >= -32) & (u <= 31)


def at_column(z: torch.Tensor, spec: QuantSpec, p: int) -> torch.Tensor:
    """kscales z [..., B] with the sub-block of column p first (the others rolled behind it), so that a
    lone column codes under them as column p of the super-block does."""
    kt = KTYPES[spec.format]
    j = p // kt.sub
    b = z.to(torch.uint8)
    if not kt.mins:
        return b.roll(-j, -1).float()
    sc, m = unpack_scales_mins(b[..., 2:])
    return torch.cat([b[..., :2], pack_scales_mins(sc.roll(-j, -1), m.roll(-j, -1))], dim=-1).float()


def positive_levels(spec: QuantSpec) -> int:
    """LSQ's Q_P per unit d: the largest sub-block scale times the largest code (63 * 15 for Q4_K,
    127 * 31 for Q6_K)."""
    kt = KTYPES[spec.format]
    return 63 * kt.nmax if kt.mins else 127 * 31


KSCALES = Side(
    "kscales",
    "K-quant super-block scales",
    lambda spec: (KTYPES[spec.format].side_bytes,),
    torch.uint8,
    lambda z, spec: torch.round(z).clamp(0, 255),
    "bytes (integers in [0, 255])",
)

KQUANT = Family(
    "kquant", fit_scales, encode, decode, inside, positive_levels, KSCALES, storage=QK_K, at_column=at_column
)
