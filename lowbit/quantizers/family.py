"""A format family, described once: what every part of the library needs to know about it.

A family (integer, NormalFloat, minifloat, ...) turns a group of weights into b-bit codes against a
per-group scale s [N, G] and, optionally, per-group side parameters z (INT: integer zero points
[N, G]). Everything else reads the family from the spec (`QuantSpec.family`):

- round-to-nearest quantize / dequantize (`lowbit.quantizers.quantize`): fit_scales, encode, decode;
- the stored layout and with it the exact cost (`stored_layout`, `storage_bits`): codes and scales
  always, `side` when the spec has one;
- fake quantization for training (`lowbit.quantizers.fake`): `inside`, `positive_levels` and
  `side_gradient` give LSQ's straight-through gradients;
- AWQ's clip search and GPTQ, through the entry points above;
- the kernels, through the format's kernel code in FORMATS (`FormatInfo.kernel`; None: reference only).

A new family is one file that builds a `Family` plus its formats in `lowbit.quantizers.spec.FORMATS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: the spec's module reads the families
    from lowbit.quantizers.spec import QuantSpec


@dataclass(frozen=True)
class Side:
    """Per-group parameters z that a family stores beside the scales, as one tensor of the layout.

    field: the tensor's name in a QTensor and a checkpoint ("zeros").
    noun: what messages call it ("zero points").
    entries: spec -> trailing dims per group: z is [N, G, *entries(spec)] (() for one value a group).
    dtype: its storage dtype.
    stored: (z float32, spec) -> float32 z exactly as stored (rounded and clamped to the storage).
    rule: what a stored z must be, for messages ("integers in [0, 2^bits - 1]").
    packed: z [N, G] of integers below 2^bits stored at the codes' width: flattened row-major and
        packed as one row of N * G codes is (`lowbit.quantizers.packing`), uint8 [ceil(N * G / 8) * bits]
        (GPTQ's `qzeros` also packs zero points at the weights' bit width); `dtype` is then uint8 and
        `entries` ().
    """

    field: str
    noun: str
    entries: Callable[[QuantSpec], tuple[int, ...]]
    dtype: torch.dtype
    stored: Callable[[torch.Tensor, QuantSpec], torch.Tensor]
    rule: str
    packed: bool = False


@dataclass(frozen=True)
class Family:
    """One format family. Tensors are float32 unless said; w [N, K], s [N, G], codes uint8 [N, K].

    name: the family's name (`QuantSpec.kind`).
    fit_scales: (w, spec) -> (s as stored, z or None): round-to-nearest scales and side parameters.
    encode: (w, s, z, spec) -> codes: the nearest code of every weight.
    decode: (codes, s, z, spec) -> w_hat [N, K].
    inside: (v [N, K] = w / expanded s, z, spec) -> bool [N, K]: where encode does not clamp v, so
        the straight-through estimator passes the gradient of w.
    positive_levels: spec -> LSQ's Q_P, the grid's positive values per unit scale.
    side: the stored side parameters, or None.
    symmetric_variant: spec.symmetric chooses a grid without the side (INT's symmetric form); for
        other families a spec is always symmetric and stores `side` when the family has one.
    codebook: (format, bits) -> float32 [2^bits], the value of every code per unit scale, for
        families with one fixed table (NF, FP); None otherwise.
    side_gradient: (codes, z, inside, spec) -> [N, K] whose gradient in z is that of w_hat / s
        (straight-through); its value is unused. None: z is not trained through fake quantization.
    storage: for a family whose format fixes how groups and scales are stored (llama.cpp's K-quants:
        256-weight super-blocks with fp16 d), that group size; a spec of the family then always has it,
        fp16 scales and no double quantization. None: the spec chooses.
    at_column: for a family whose values depend on a column's place in its group (K-quants' sub-block
        scales): (z [N, 1, *entries] of one group, spec, p) -> the z under which a single column codes
        as column p of the group does (GPTQ codes column by column). None: the place does not matter.
    """

    name: str
    fit_scales: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    encode: Callable[..., torch.Tensor]
    decode: Callable[..., torch.Tensor]
    inside: Callable[..., torch.Tensor]
    positive_levels: Callable[[QuantSpec], int]
    side: Side | None = None
    symmetric_variant: bool = False
    codebook: Callable[[str, int], torch.Tensor] | None = None
    side_gradient: Callable[..., torch.Tensor] | None = None
    storage: int | None = None
    at_column: Callable[..., torch.Tensor] | None = None


def positive_entries(values: torch.Tensor) -> int:
    """Number of finite positive entries of a codebook (LSQ's Q_P of a codebook family)."""
    return int((torch.isfinite(values) & (values > 0)).sum())
