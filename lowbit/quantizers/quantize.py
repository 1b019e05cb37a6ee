"""Format-independent entry points: round-to-nearest `quantize` / `dequantize` and their parts.

quantize(W, spec) = pack_qtensor(encode(W, s, z, spec), s, z, spec) with (s, z) = fit_scales(W, spec);
the scales are rounded to their storage inside fit_scales, so the codes are chosen against exactly the
scales `dequantize` reads back. Algorithms that choose codes or scales themselves (GPTQ-style error
feedback, learned scales) use fit_scales / encode / decode / pack_qtensor directly. The spec's format
family (`lowbit.quantizers.family`) provides fit_scales, encode and decode with the signatures below;
z is the family's side parameters (asymmetric INT: zero points), None where the spec has none.
"""

from __future__ import annotations

import torch

from lowbit.quantizers.family import Family
from lowbit.quantizers.groups import load_scales, store_scales
from lowbit.quantizers.layout import stored_layout
from lowbit.quantizers.packing import pack, unpack
from lowbit.quantizers.qtensor import QTensor
from lowbit.quantizers.spec import FORMATS, QuantInputError, QuantSpec, SpecError


def _family(spec: QuantSpec) -> Family:
    if not isinstance(spec, QuantSpec):
        raise SpecError(f"expected a QuantSpec, got {type(spec).__name__}")
    return spec.family


def _check_weight(w: torch.Tensor) -> torch.Tensor:
    """A 2-D, non-empty, finite floating-point weight, as float32."""
    if not isinstance(w, torch.Tensor):
        raise QuantInputError(f"weight must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise QuantInputError(f"weight must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise QuantInputError(f"weight is empty, shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise QuantInputError(f"weight must be floating point, got {w.dtype}")
    w = w.float()
    # a NaN/Inf anywhere makes the sum non-finite; the full check runs only then (the sum may overflow)
    if not bool(torch.isfinite(w.sum())) and not bool(torch.isfinite(w).all()):
        raise QuantInputError("weight contains NaN/Inf")
    return w


def check_side(z: torch.Tensor | None, spec: QuantSpec, shape: tuple[int, int], stored: bool = True) -> None:
    """z given iff the spec has side parameters, shaped [N, G, *entries]; with `stored`, also exactly
    as its storage holds it (asymmetric INT: integers in [0, 2^b - 1])."""
    side = spec.side
    if side is None:
        if z is not None:
            raise QuantInputError(f"{spec.short()} has no zero points or other side parameters, yet z given")
        return
    want = (shape[0], spec.groups(shape[1]), *side.entries(spec))
    if not isinstance(z, torch.Tensor) or tuple(z.shape) != want:
        raise QuantInputError(f"{spec.short()} needs {side.noun} of shape {want}")
    z = z.float()
    if stored and not (bool(torch.isfinite(z).all()) and torch.equal(side.stored(z, spec), z)):
        raise QuantInputError(f"{side.noun} of {spec.short()} must be {side.rule}")


def _check_scales(s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec, shape: tuple[int, int]) -> None:
    """s [N, G] finite and positive; z as `check_side` wants it."""
    n, k = shape
    want = (n, spec.groups(k))
    if not isinstance(s, torch.Tensor) or tuple(s.shape) != want:
        got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise QuantInputError(f"scales must have shape {want} for a {shape} weight, got {got}")
    if not bool(torch.isfinite(s).all() and (s > 0).all()):
        raise QuantInputError("scales must be finite and positive")
    check_side(z, spec, shape)


def _check_codes(codes: torch.Tensor, spec: QuantSpec) -> None:
    if not isinstance(codes, torch.Tensor):
        raise QuantInputError(f"codes must be a 2-D uint8 tensor, got {type(codes).__name__}")
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise QuantInputError(f"codes must be a 2-D uint8 tensor, got {tuple(codes.shape)} {codes.dtype}")
    if codes.numel() and int(codes.max()) >> spec.bits:
        raise QuantInputError(f"codes of {spec.format} must be < 2^{spec.bits}, got {int(codes.max())}")


def fit_scales(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest scales of W [N, K]: (s float32 [N, G], z float32 [N, G, *entries] or None).

    s is already rounded exactly to how it is stored (scale dtype, or the double-quantization round
    trip); z, the side parameters (asymmetric INT: integer zero points), too.
    """
    family = _family(spec)
    return family.fit_scales(_check_weight(w), spec)


def encode(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Nearest codes of W [N, K] against the given scales: uint8 [N, K] (unpacked)."""
    family = _family(spec)
    w = _check_weight(w)
    _check_scales(s, z, spec, tuple(w.shape))
    return family.encode(w, s.float(), None if z is None else z.float(), spec)


def decode(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Dequantized values of codes uint8 [N, K] with scales s [N, G] (and zeros z): float32 [N, K]."""
    family = _family(spec)
    _check_codes(codes, spec)
    _check_scales(s, z, spec, tuple(codes.shape))
    return family.decode(codes, s.float(), None if z is None else z.float(), spec)


def pack_side(z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Side parameters z [N, G] (integers below 2^bits) as a packed side stores them: flattened row-major
    and packed as one row of codes, uint8 [ceil(N * G / 8) * bits]."""
    return pack(z.to(torch.uint8).reshape(1, -1), spec.bits).view(-1)


def pack_qtensor(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec) -> QTensor:
    """Bundle codes uint8 [N, K], scales s [N, G] and side parameters z (zero points [N, G]) into a QTensor.

    The scales are stored without further rounding when s came from `fit_scales`.
    """
    _family(spec)
    _check_codes(codes, spec)
    shape = (int(codes.shape[0]), int(codes.shape[1]))
    _check_scales(s, z, spec, shape)
    scales, dq_absmax = store_scales(s.float(), spec)
    tensors = {"codes": pack(codes, spec.bits), "scales": scales, "dq_absmax": dq_absmax}
    side = spec.side
    if side is not None:
        tensors[side.field] = pack_side(z, spec) if side.packed else z.to(side.dtype)
    return QTensor.from_tensors(tensors, spec, shape)


def _check_qtensor(q: QTensor) -> None:
    if not isinstance(q, QTensor):
        raise QuantInputError(f"expected a QTensor, got {type(q).__name__}")
    expect = {field: shape for field, (shape, _) in stored_layout(q.spec, *q.shape).items()}
    stored = q.tensors()
    if set(stored) != set(expect):
        raise QuantInputError(f"QTensor of {q.spec.short()} must hold {sorted(expect)}, has {sorted(stored)}")
    for name, want in expect.items():
        if tuple(stored[name].shape) != want:
            raise QuantInputError(f"QTensor {name} has shape {tuple(stored[name].shape)}, expected {want}")


def unpack_codes(q: QTensor) -> torch.Tensor:
    """The codes of a QTensor, unpacked: uint8 [N, K]."""
    _check_qtensor(q)
    return unpack(q.codes, q.spec.bits, q.shape[1])


def decode_scales(q: QTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scales and side parameters of a QTensor: (s float32 [N, G], z float32 or None)."""
    _check_qtensor(q)
    s = load_scales(q.scales, q.dq_absmax, q.spec)
    side = q.spec.side
    if side is None:
        return s, None
    z = q.tensors()[side.field]
    return s, (unpack(z[None], q.spec.bits, s.numel()).view(s.shape) if side.packed else z).float()


def quantize(w: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Round-to-nearest quantization of W [N, K] (out_features, in_features) in the format of spec."""
    family = _family(spec)
    w = _check_weight(w)
    s, z = family.fit_scales(w, spec)
    return pack_qtensor(family.encode(w, s, z, spec), s, z, spec)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_hat [N, K] in `dtype` from a QTensor."""
    codes = unpack_codes(q)
    s, z = decode_scales(q)
    return _family(q.spec).decode(codes, s, z, q.spec).to(dtype)


def codebook(format: str) -> torch.Tensor:
    """Value of every code of a format with one fixed codebook, float32 [2^bits]: nf2/nf3/nf4, fp4_e2m1,
    fp8_e4m3/e5m2.

    Multiply by the group scale to dequantize. Uniform integer formats have no fixed codebook (their
    values depend on the zero point) and raise SpecError, as do families whose values are per group.
    """
    info = FORMATS.get(format)
    if info is None or info.family.codebook is None:
        known = [f for f, i in FORMATS.items() if i.family.codebook is not None]
        raise SpecError(f"{format!r} has no codebook; codebook formats: {', '.join(known)}")
    return info.family.codebook(format, info.bits)
