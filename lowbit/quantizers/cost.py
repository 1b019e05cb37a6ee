"""Exact storage cost of a quantized matrix, in bits, as a QTensor stores it.

For W [N, K] with G = spec.groups(K) groups per row and b-bit codes:
  codes   N * ceil(K / 8) * b * 8                      (rows packed independently, see packing)
  scales  N * G * bits(scale_dtype), or with double quantization N * G * 8 + 32 * ceil(N * G / DQ_BLOCK)
  zeros   N * G * 8                                    (asymmetric INT only; stored as uint8)
The ragged last group of a row counts as one whole group. `storage_bits` equals 8 * QTensor.nbytes().
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from lowbit.quantizers.packing import packed_row_bytes
from lowbit.quantizers.spec import DQ_BLOCK, SCALE_DTYPES, QuantSpec, SpecError


def _shape(shape: Sequence[int]) -> tuple[int, int]:
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        dims = ()
    if len(dims) != 2 or min(dims) <= 0:
        raise SpecError(f"shape must be two positive integers (N, K), got {tuple(shape)!r}")
    return dims[0], dims[1]


def storage_bits(spec: QuantSpec, shape: Sequence[int]) -> int:
    """Total stored bits (codes + scales + zeros + second-level scales) of a [N, K] matrix."""
    n, k = _shape(shape)
    groups = n * spec.groups(k)
    codes = n * packed_row_bytes(k, spec.bits) * 8
    if spec.double_quant:
        scales = groups * 8 + 32 * -(-groups // DQ_BLOCK)
    else:
        scales = groups * SCALE_DTYPES[spec.scale_dtype].itemsize * 8
    zeros = groups * 8 if spec.kind == "int" and not spec.symmetric else 0
    return codes + scales + zeros


def bits_per_weight(spec: QuantSpec, shape: Sequence[int]) -> float:
    """Stored bits per weight of a [N, K] matrix: storage_bits / (N * K)."""
    n, k = _shape(shape)
    return storage_bits(spec, (n, k)) / (n * k)
