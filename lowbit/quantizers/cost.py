"""Exact storage cost of a quantized matrix, in bits, as a QTensor stores it.

For W [N, K] with G = spec.groups(K) groups per row and b-bit codes:
  codes   N * ceil(K / 8) * b * 8                      (rows packed independently, see packing)
  scales  N * G * bits(scale_dtype), or with double quantization N * G * 8 + 32 * ceil(N * G / DQ_BLOCK)
  side    the family's side parameters when the spec has them (asymmetric INT: b-bit zero points packed
          like codes, ceil(N * G / 8) * b * 8)
The ragged last group of a row counts as one whole group. `storage_bits` sums `stored_layout` and equals
8 * QTensor.nbytes().
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

from lowbit.quantizers.layout import stored_layout
from lowbit.quantizers.spec import QuantSpec, SpecError


def _shape(shape: Sequence[int]) -> tuple[int, int]:
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        dims = ()
    if len(dims) != 2 or min(dims) <= 0:
        raise SpecError(f"shape must be two positive integers (N, K), got {tuple(shape)!r}")
    return dims[0], dims[1]


def storage_bits(spec: QuantSpec, shape: Sequence[int]) -> int:
    """Total stored bits (codes + scales + zeros + second-level scales) of a [N, K] matrix: every
    tensor of its `stored_layout`."""
    n, k = _shape(shape)
    layout = stored_layout(spec, n, k).values()
    return sum(math.prod(dims) * dtype.itemsize * 8 for dims, dtype in layout)


def bits_per_weight(spec: QuantSpec, shape: Sequence[int]) -> float:
    """Stored bits per weight of a [N, K] matrix: storage_bits / (N * K)."""
    n, k = _shape(shape)
    return storage_bits(spec, (n, k)) / (n * k)
