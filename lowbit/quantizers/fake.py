"""Fake quantization for training: straight-through rounding and learned step sizes, as pure functions.

The forward value of `fake_quantize(w, s, z, spec)` is exactly what the stored checkpoint reads back,

    W_hat = decode(encode(w, s_hat, z_hat), s_hat, z_hat)      s_hat = scales as stored, z_hat = round(z)

so a model trained with fake quantization and the model re-quantized with `requantize` compute the same
function. Its gradient is that of LSQ (Esser et al. 2020, "Learned Step Size Quantization", eq. 3-5),
with the straight-through estimator (STE) for every rounding: for v = w / s,

    dW_hat / dw = 1 inside the grid's range, 0 where v is clamped              (the STE)
    dW_hat / ds = q(v) - v inside the range, q(v) where clamped                 (the step-size gradient)
    dW_hat / dz = 0 inside the range, -s where clamped      (asymmetric INT: a learned offset, as LSQ+)

where q(v) = W_hat / s is the value of the chosen code: c - z (asymmetric INT), c - 2^(b-1) (symmetric
INT), codebook[c] (NF: LSQ on the absmax scale with the STE through the nearest-codebook rounding; FP:
through the cast to the minifloat grid). The range and the gradient in z are the format family's
(`Family.inside`, `Family.side_gradient`), as are Q_P (`Family.positive_levels`) and how z is stored.
The rounding of s to its storage (scale dtype, or double quantization) is straight-through too. LSQ's
gradient scale g = 1 / sqrt(n_per_step * Q_P) (`lsq_grad_scale`, with n_per_step = the group size)
multiplies the gradients of s and z.

`peqa_dequantize` is PEQA's parametrisation (Kim et al. 2023, "Memory-Efficient Fine-Tuning of
Compressed Large Language Models via sub-4-bit Integer Quantization"): the integer codes and zero
points frozen, W_hat = s * (c - z) differentiable in the scales alone. L4Q (Jeon et al. 2024, "L4Q:
Parameter Efficient Quantization-Aware Fine-Tuning on Large Language Models") applies `fake_quantize`
to W0 + B A, so the LoRA factors train through the quantizer.
"""

from __future__ import annotations

import math

import torch

from lowbit.quantizers.groups import effective_group_size, expand_groups, round_scales
from lowbit.quantizers.qtensor import QTensor
from lowbit.quantizers.quantize import check_side, decode, encode, pack_qtensor
from lowbit.quantizers.spec import QuantInputError, QuantSpec


def _straight_through(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`value` exactly in the forward pass, the gradient of x in the backward pass.

    value + (x - x.detach()) adds an exact zero; the usual x + (value - x).detach() may be off by a
    rounding error of value - x, which would break bit-exactness with the stored model.
    """
    return value.detach() + (x - x.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return _straight_through(torch.round(x.detach()), x)


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x forward, gradient multiplied by g backward (LSQ's `gradscale`, section 2.2)."""
    return _straight_through(x.detach(), x * g)


def positive_levels(spec: QuantSpec) -> int:
    """Q_P of LSQ's gradient scale, the number of positive grid values of one scale: 2^b - 1 (asymmetric INT),
    2^(b-1) - 1 (symmetric INT), the positive codebook entries (NF, FP)."""
    return spec.family.positive_levels(spec)


def lsq_grad_scale(spec: QuantSpec, in_features: int) -> float:
    """LSQ's step-size gradient scale g = 1 / sqrt(n_per_step * Q_P), n_per_step = the group size."""
    n = effective_group_size(spec, in_features)
    return 1.0 / math.sqrt(n * max(positive_levels(spec), 1))


def _check(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec) -> None:
    if not isinstance(spec, QuantSpec):
        raise QuantInputError(f"expected a QuantSpec, got {type(spec).__name__}")
    if w.dim() != 2 or not w.is_floating_point():
        raise QuantInputError(f"weight must be a 2-D float tensor, got {tuple(w.shape)} {w.dtype}")
    want = (w.shape[0], spec.groups(w.shape[1]))
    if tuple(s.shape) != want:
        raise QuantInputError(
            f"scales must have shape {want} for a {tuple(w.shape)} weight, got {tuple(s.shape)}"
        )
    check_side(z, spec, tuple(w.shape), stored=False)


def stored_scales(s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """s [N, G] rounded exactly as it will be stored (positive, scale dtype or double quantization);
    straight-through backward."""
    return _straight_through(round_scales(s.detach(), spec), s)


def stored_side(z: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor | None:
    """Side parameters z exactly as stored (zero points: integers in [0, 2^b - 1]); straight-through
    backward. None stays None."""
    if z is None:
        return None
    return _straight_through(spec.side.stored(z.detach().float(), spec), z)


def fake_quantize(
    w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec, g: float = 1.0
) -> torch.Tensor:
    """W_hat float32 [N, K]: w [N, K] quantized with scales s [N, G] (and zeros z [N, G]), differentiable.

    Forward: exactly decode(encode(w, s_hat, z_hat), s_hat, z_hat) with s_hat, z_hat as stored. Backward:
    LSQ with the STE (module docstring); g scales the gradients of s and z (`lsq_grad_scale`).
    """
    _check(w, s, z, spec)
    k = w.shape[1]
    gs = effective_group_size(spec, k)
    s_hat = stored_scales(grad_scale(s.float(), g), spec)  # [N, G]
    z_hat = None if z is None else stored_side(grad_scale(z.float(), g), spec)
    w32 = w.float()
    with torch.no_grad():
        s_d = s_hat.detach()
        z_d = None if z_hat is None else z_hat.detach()
        codes = encode(w32.detach(), s_d, z_d, spec)  # uint8 [N, K]
        q = decode(codes, torch.ones_like(s_d), z_d, spec)  # value of each code per unit scale
        S_d = expand_groups(s_d, k, gs)  # [N, K]
        value = S_d * q  # = decode(codes, s_d, z_d, spec): the stored model's weight, float32 [N, K]
        v = w32.detach() / S_d
        inside = spec.family.inside(v, z_d, spec)
        v_in = torch.where(inside, v, 0.0)  # v may overflow to inf where it clamps (tiny learned scales)
        inside = inside.float()
    S = expand_groups(s_hat, k, gs)  # [N, K], carries the gradient of s
    surrogate = S * (q - v_in) + inside * w32
    side_gradient = spec.family.side_gradient
    if z_hat is not None and side_gradient is not None:
        surrogate = surrogate + S.detach() * side_gradient(codes, z_hat, inside, spec)
    return value + (surrogate - surrogate.detach())


def peqa_dequantize(
    codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """PEQA's W_hat = s_hat * q(c) float32 [N, K] for frozen codes uint8 [N, K] (and frozen zeros z),
    differentiable in the scales s [N, G] (rounded to their storage with the STE)."""
    return decode(codes, stored_scales(s.float(), spec), None if z is None else z.float(), spec)


def requantize(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec) -> QTensor:
    """The QTensor of w [N, K] under learned scales s [N, G] (and zeros z): codes encoded against the
    scales as stored, so dequantize(result) equals fake_quantize(w, s, z, spec) exactly."""
    _check(w, s, z, spec)
    with torch.no_grad():
        s_hat = round_scales(s.detach().float(), spec)
        z_hat = stored_side(None if z is None else z.detach().float(), spec)
        return pack_qtensor(encode(w.detach().float(), s_hat, z_hat, spec), s_hat, z_hat, spec)


def project_to_codes(
    w: torch.Tensor,
    codes: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
    inset: float = 0.0,
    iters: int = 20,
) -> torch.Tensor:
    """w [N, K] moved, element by element, to the nearest point that encodes to `codes` [N, K] under the
    scales s [N, G] (and zeros z) as stored: w clipped into its code's rounding cell, in `dtype`.

    A latent weight for LSQ that starts training exactly at a given quantized model (GPTQ's codes, say):
    fake_quantize(result, s, z, spec) equals decode(codes, s, z, spec), yet inside each cell the latent
    keeps where w lies, so LSQ's step-size gradient q(v) - v is not zero as it is at the grid points.
    A cell is an interval around its grid point c, so the points c + t (w - c), t in [0, 1], that keep
    the code form an interval from t = 0; `iters` bisection steps find its end (to 2^-iters), and only
    points checked to encode to `codes` are returned (where none is, the grid point itself).

    inset in [0, 1): points that had to move stop that fraction of the way back from the cell's edge
    toward the grid point (0: on the edge). On the edge, the smallest change of the scale flips the code
    back to round-to-nearest of w; inset 1/2 leaves a quarter of a step between such a point and the edge.
    """
    if not 0 <= inset < 1:
        raise QuantInputError(f"inset must be in [0, 1), got {inset!r}")
    _check(w, s, z, spec)
    if tuple(codes.shape) != tuple(w.shape):
        raise QuantInputError(f"codes have shape {tuple(codes.shape)}, the weight {tuple(w.shape)}")
    with torch.no_grad():
        s_hat = round_scales(s.detach().float(), spec)
        z_hat = stored_side(None if z is None else z.detach().float(), spec)
        center = decode(codes, s_hat, z_hat, spec)  # float32 [N, K]
        w32 = w.detach().float()
        step = w32 - center

        def point(t: torch.Tensor) -> torch.Tensor:  # t = 1 is w itself, exactly
            return torch.where(t == 1, w32, center + t * step).to(dtype)

        def keeps(t: torch.Tensor) -> torch.Tensor:
            return encode(point(t).float(), s_hat, z_hat, spec) == codes

        ones = torch.ones_like(center)
        whole = keeps(ones)
        lo = torch.where(whole, ones, 0.0)
        hi = ones
        for _ in range(iters):
            mid = torch.where(whole, ones, (lo + hi) / 2)
            ok = keeps(mid)
            lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
        out = point(torch.where(whole, ones, lo * (1 - inset)))
        return torch.where(encode(out.float(), s_hat, z_hat, spec) == codes, out, center.to(dtype))
