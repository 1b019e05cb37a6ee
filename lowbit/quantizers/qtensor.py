"""QTensor: the one representation of a quantized weight matrix (packed codes + scales + zeros + spec)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.quantizers.spec import QuantSpec

# Tensor fields of a QTensor, in the order they are stored; a checkpoint stores `{layer}.{field}`
# for each field that is not None.
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
    zeros: uint8 [N, G] integer zero points (asymmetric INT only), else None.
    dq_absmax: float32 [ceil(N * G / DQ_BLOCK)] per-block max of the scales (double
        quantization only), else None.
    spec: the QuantSpec that produced it.
    shape: (N, K).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    dq_absmax: torch.Tensor | None
    spec: QuantSpec
    shape: tuple[int, int]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name, None fields left out."""
        return {f: getattr(self, f) for f in TENSOR_FIELDS if getattr(self, f) is not None}

    def nbytes(self) -> int:
        """Exact storage in bytes of every stored tensor."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())
