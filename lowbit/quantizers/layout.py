"""The stored layout of a quantized matrix: the one definition of which tensors a spec stores.

For W [N, K] under a spec with G = spec.groups(K) groups per row and b-bit codes:

    codes      [N, ceil(K / 8) * b]      uint8    rows packed independently (`lowbit.quantizers.packing`)
    scales     [N, G]                    the scale dtype, or uint8 second-level codes (double quantization)
    side       [N, G, *entries]          the family's side parameters when the spec has them
                                         (`QuantSpec.side`), or packed [ceil(N * G / 8) * b] uint8
                                         (`Side.packed`; asymmetric INT's `zeros`: b-bit zero points,
                                         row-major [N, G] packed as one row of codes)
    dq_absmax  [ceil(N * G / DQ_BLOCK)]  float32  double quantization only

QTensor checks, QLinear's buffers, checkpoint loading and the storage cost (`lowbit.quantizers.cost`)
all read it from `stored_layout`.
"""

from __future__ import annotations

import torch

from lowbit.quantizers.groups import DQ_BLOCK, SCALE_DTYPES
from lowbit.quantizers.packing import packed_row_bytes
from lowbit.quantizers.spec import QuantSpec


def stored_layout(spec: QuantSpec, out_features: int, in_features: int) -> dict[str, tuple]:
    """{field: (shape, dtype)} of every tensor stored for W [out_features, in_features] under `spec`."""
    N, K = out_features, in_features
    G = spec.groups(K)
    layout = {"codes": ((N, packed_row_bytes(K, spec.bits)), torch.uint8)}
    layout["scales"] = ((N, G), torch.uint8 if spec.double_quant else SCALE_DTYPES[spec.scale_dtype])
    side = spec.side
    if side is not None and side.packed:
        layout[side.field] = ((packed_row_bytes(N * G, spec.bits),), torch.uint8)
    elif side is not None:
        layout[side.field] = ((N, G, *side.entries(spec)), side.dtype)
    if spec.double_quant:
        layout["dq_absmax"] = ((-(-(N * G) // DQ_BLOCK),), torch.float32)
    return layout
