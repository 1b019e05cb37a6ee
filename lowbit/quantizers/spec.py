"""Quantization specs: which format, how many bits, how weights are grouped, how scales are stored.

A spec is a frozen dataclass; it serialises to a flat JSON dict (`to_dict` / `from_dict`) that the
checkpoint manifest and recipe files use. `FORMATS` is the single registry of weight formats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class FormatInfo:
    """Static facts about one weight format.

    kind: "int" (uniform integer), "nf" (NormalFloat codebook), "fp" (minifloat).
    bits: bits per stored code.
    """

    kind: str
    bits: int


FORMATS: dict[str, FormatInfo] = {
    "int2": FormatInfo("int", 2),
    "int3": FormatInfo("int", 3),
    "int4": FormatInfo("int", 4),
    "int8": FormatInfo("int", 8),
    "nf2": FormatInfo("nf", 2),
    "nf3": FormatInfo("nf", 3),
    "nf4": FormatInfo("nf", 4),
    "fp8_e4m3": FormatInfo("fp", 8),
    "fp8_e5m2": FormatInfo("fp", 8),
    "fp4_e2m1": FormatInfo("fp", 4),
}

SCALE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}

# Second-level (double) quantization of block scales, QLoRA section 3: 8-bit codes for the scales,
# one fp32 absmax per block of DQ_BLOCK scales.
DQ_BLOCK = 256


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
    symmetric: INT only. Symmetric: w ~ s * (c - 2^(b-1)); asymmetric: w ~ s * (c - z) with an
        integer zero point z per group. NF and FP formats are always symmetric (absmax scaling).
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
        if self.group_size is not None:
            if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 8:
                raise SpecError(
                    f"group size must be a positive multiple of 8 or None (per-channel), "
                    f"got {self.group_size!r}"
                )
        if self.scale_dtype not in SCALE_DTYPES:
            raise SpecError(f"unknown scale dtype {self.scale_dtype!r}; known: {', '.join(SCALE_DTYPES)}")
        if not self.symmetric and self.kind != "int":
            object.__setattr__(self, "symmetric", True)

    @property
    def kind(self) -> str:
        return FORMATS[self.format].kind

    @property
    def bits(self) -> int:
        return FORMATS[self.format].bits

    @property
    def has_zeros(self) -> bool:
        """Whether integer zero points are stored (asymmetric INT)."""
        return self.kind == "int" and not self.symmetric

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
        tail = "-sym" if self.kind == "int" and self.symmetric else ""
        return f"{self.format}-{g}{tail}{'-dq' if self.double_quant else ''}"
