"""Quantization specs: which format, how many bits, how weights are grouped, how scales are stored.

A spec is a frozen dataclass; it serialises to a flat JSON dict (`to_dict` / `from_dict`) that the
checkpoint manifest and recipe files use. `FORMATS` is the single registry of weight formats: each
names its family (`lowbit.quantizers.family`), which everything else reads through the spec.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lowbit.quantizers.family import Family, Side
from lowbit.quantizers.fp import MINIFLOAT
from lowbit.quantizers.groups import SCALE_DTYPES
from lowbit.quantizers.integer import INTEGER
from lowbit.quantizers.kquant import KQUANT
from lowbit.quantizers.nf import NORMALFLOAT


@dataclass(frozen=True)
class FormatInfo:
    """One weight format: its family (`lowbit.quantizers.family`), bits per stored code, and the Triton
    kernels' FMT constexpr for it (None: the reference kernel only)."""

    family: Family
    bits: int
    kernel: str | None = None

    @property
    def kind(self) -> str:
        return self.family.name


FORMATS: dict[str, FormatInfo] = {
    "int2": FormatInfo(INTEGER, 2, "int"),
    "int3": FormatInfo(INTEGER, 3, "int"),
    "int4": FormatInfo(INTEGER, 4, "int"),
    "int8": FormatInfo(INTEGER, 8, "int"),
    "nf2": FormatInfo(NORMALFLOAT, 2, "nf"),
    "nf3": FormatInfo(NORMALFLOAT, 3, "nf"),
    "nf4": FormatInfo(NORMALFLOAT, 4, "nf"),
    "fp8_e4m3": FormatInfo(MINIFLOAT, 8, "fp8_e4m3"),
    "fp8_e5m2": FormatInfo(MINIFLOAT, 8, "fp8_e5m2"),
    "fp4_e2m1": FormatInfo(MINIFLOAT, 4, "fp4_e2m1"),
    "q4_k": FormatInfo(KQUANT, 4),
    "q5_k": FormatInfo(KQUANT, 5),
    "q6_k": FormatInfo(KQUANT, 6),
}


class SpecError(ValueError):
    """A quantization spec that cannot be honoured (unknown format, bad group size, ...)."""


class QuantInputError(SpecError):
    """A tensor that cannot be quantized, encoded or packed (wrong rank or dtype, NaN/Inf, codes or
    scales out of range). A SpecError, so one except clause covers every bad quantizer input."""


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix W [N, K] (out_features, in_features) is quantized.

    format: a key of FORMATS.
    group_size: number of consecutive input channels sharing one scale (and zero); None means one
        group per output channel (per-channel). When K % group_size != 0 the last group of each
        row is shorter; nothing is padded in the scales.
    symmetric: for a family with a symmetric variant (INT): w ~ s * (c - 2^(b-1)); asymmetric:
        w ~ s * (c - z) with an integer zero point z per group. Specs of other families (NF, FP) are
        always symmetric.
        K-quant formats (q4_k, q5_k, q6_k) fix group_size (256), scale_dtype (float16) and
        double_quant (False) whatever is given (`Family.storage`).
    scale_dtype: storage dtype of the scales, a key of SCALE_DTYPES.
    double_quant: QLoRA double quantization of the scales (8-bit codes + fp32 per DQ_BLOCK scales);
        scale_dtype is then unused.
    """

    format: str = "int4"
    group_size: int | None = 128
    symmetric: bool = False
    scale_dtype: str = "float16"
    double_quant: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise SpecError(f"unknown format {self.format!r}; known formats: {', '.join(FORMATS)}")
        if self.family.storage is not None:  # the format fixes its grouping and scale storage (K-quants)
            object.__setattr__(self, "group_size", self.family.storage)
            object.__setattr__(self, "scale_dtype", "float16")
            object.__setattr__(self, "double_quant", False)
        if self.group_size is not None:
            if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 8:
                raise SpecError(
                    f"group size must be a positive multiple of 8 or None (per-channel), "
                    f"got {self.group_size!r}"
                )
        if self.scale_dtype not in SCALE_DTYPES:
            raise SpecError(f"unknown scale dtype {self.scale_dtype!r}; known: {', '.join(SCALE_DTYPES)}")
        if not self.symmetric and not self.family.symmetric_variant:
            object.__setattr__(self, "symmetric", True)

    @property
    def family(self) -> Family:
        return FORMATS[self.format].family

    @property
    def kind(self) -> str:
        return FORMATS[self.format].kind

    @property
    def bits(self) -> int:
        return FORMATS[self.format].bits

    @property
    def kernel(self) -> str | None:
        """The Triton kernels' FMT constexpr for this format; None: reference kernel only."""
        return FORMATS[self.format].kernel

    @property
    def side(self) -> Side | None:
        """The per-group side parameters this spec stores (asymmetric INT: zero points), or None."""
        family = self.family
        return None if family.symmetric_variant and self.symmetric else family.side

    @property
    def has_zeros(self) -> bool:
        """Whether the `zeros` tensor (integer zero points) is stored."""
        return self.side is not None and self.side.field == "zeros"

    def groups(self, in_features: int) -> int:
        """Number of scale groups per row for K = in_features."""
        g = self.group_size or in_features
        return -(-in_features // g)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise SpecError(f"unknown quantization spec keys: {sorted(unknown)}")
        return cls(**d)

    def short(self) -> str:
        """Human-readable name such as 'int4-g128' or 'nf4-g64-dq' or 'fp8_e4m3-pc'."""
        g = f"g{self.group_size}" if self.group_size else "pc"
        tail = "-sym" if self.family.symmetric_variant and self.symmetric else ""
        return f"{self.format}-{g}{tail}{'-dq' if self.double_quant else ''}"
