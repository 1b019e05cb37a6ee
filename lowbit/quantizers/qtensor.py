"""QTensor: the one representation of a quantized weight matrix (packed codes + scales + zeros + spec)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.quantizers.spec import QuantSpec

# The tensor fields every QTensor has, in the order they are stored; a checkpoint stores `{layer}.{field}`
# for each field that is not None, and for each tensor of `extra`.
TENSOR_FIELDS = ("codes", "scales", "zeros", "dq_absmax")


@dataclass
class QTensor:
    """A quantized weight W [N, K] = [out_features, in_features].

    codes: uint8 [N, row_bytes], each row's K codes bit-packed independently (see
        `lowbit.quantizers.packing`: row_bytes = ceil(K / 8) * bits).
    scales: [N, G] with G = spec.groups(K), dtype SCALE_DTYPES[spec.scale_dtype]; when
        spec.double_quant, uint8 [N, G] second-level codes (1..255) instead: in float32,
        s = dq_absmax[b] * (code / 255) for the block b = (n * G + g) // DQ_BLOCK of the flattened
        scales (scales are positive, so an unsigned code spends all 8 bits; re-quantizing
        dequantized scales is exact).
    zeros: integer zero points z [N, G] in [0, 2^bits - 1] (asymmetric INT only), flattened row-major and
        packed at the codes' width as one row of codes: uint8 [ceil(N * G / 8) * bits]; else None.
    dq_absmax: float32 [ceil(N * G / DQ_BLOCK)] per-block max of the scales (double
        quantization only), else None.
    spec: the QuantSpec that produced it.
    shape: (N, K).
    extra: a family's other stored tensors by field name (its side parameters when they are not
        `zeros`, see `QuantSpec.side`), shaped as `stored_layout` says; empty for INT, NF and FP.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    dq_absmax: torch.Tensor | None
    spec: QuantSpec
    shape: tuple[int, int]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor | None], spec: QuantSpec, shape: tuple) -> QTensor:
        """The QTensor holding `tensors` by field name (those of TENSOR_FIELDS as fields, others in extra)."""
        rest = {f: t for f, t in tensors.items() if t is not None}
        fields = {f: rest.pop(f, None) for f in TENSOR_FIELDS}
        return cls(**fields, spec=spec, shape=(int(shape[0]), int(shape[1])), extra=rest)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name, None fields left out."""
        fixed = {f: getattr(self, f) for f in TENSOR_FIELDS if getattr(self, f) is not None}
        return {**fixed, **self.extra}

    def nbytes(self) -> int:
        """Exact storage in bytes of every stored tensor."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())
