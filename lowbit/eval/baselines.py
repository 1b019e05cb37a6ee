"""Uniform round-to-nearest baselines measured beside a compressed model, at similar sizes.

A compressed checkpoint is only worth its bits if it beats the plain spec of about the same size: `lowbit
compress --eval` measures the nearest of RTN_BASELINES (all of them for several budgets) on the same model
and text, with bits per weight counted exactly as for the checkpoint.
"""

from __future__ import annotations

from lowbit.compress.presets import preset
from lowbit.quantizers import storage_bits

# Uniform round-to-nearest presets measured beside allocated budgets.
RTN_BASELINES = ("int2-g64", "int3-g128", "int4-g128")


def uniform_bits_per_weight(name: str, shapes: list[tuple[int, int]]) -> float:
    """Bits per weight of a uniform preset over layers of these shapes."""
    spec = preset(name).quantize.spec()
    return sum(storage_bits(spec, s) for s in shapes) / sum(n * k for n, k in shapes)


def nearest_baseline(bits_per_weight: float, shapes: list[tuple[int, int]]) -> str:
    """The baseline preset whose size over layers of these shapes is closest to `bits_per_weight`."""
    sizes = {name: uniform_bits_per_weight(name, shapes) for name in RTN_BASELINES}
    return min(sizes, key=lambda name: abs(sizes[name] - bits_per_weight))
