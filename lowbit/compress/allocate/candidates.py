"""The candidate grid: one (format, bits, group size, rank) configuration per matrix, its exact size in
bits, and the budget B in bits."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lowbit.quantizers import FORMATS, QuantSpec, SpecError, storage_bits

PREDICATE_KEYS = ("format", "kind", "bits", "group_size", "symmetric", "scale_dtype", "double_quant", "rank")


class AllocationError(ValueError):
    """An allocation that cannot be made: infeasible budget, bad table, constraints leaving no candidate."""


@dataclass(frozen=True)
class Candidate:
    """One configuration of a matrix W [N, K] ~ Q + L1 L2: Q's quantization spec and the rank of L1 L2."""

    spec: QuantSpec
    rank: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.spec, QuantSpec):
            raise AllocationError(f"candidate spec must be a QuantSpec, got {type(self.spec).__name__}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise AllocationError(f"candidate rank must be an integer >= 0, got {self.rank!r}")

    def short(self) -> str:
        """E.g. 'int3-g64-r16'."""
        return f"{self.spec.short()}-r{self.rank}"

    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(), "rank": self.rank}

    @classmethod
    def from_dict(cls, d: dict) -> Candidate:
        try:
            return cls(QuantSpec.from_dict(d["spec"]), d["rank"])
        except (KeyError, TypeError, SpecError) as e:
            raise AllocationError(f"bad candidate {d!r}: {e}") from None

    def matches(self, predicate: dict) -> bool:
        """True when each key of `predicate` (in PREDICATE_KEYS) equals, or lists, this candidate's value."""
        unknown = set(predicate) - set(PREDICATE_KEYS)
        if unknown:
            raise AllocationError(
                f"unknown candidate predicate key(s) {sorted(unknown)}; known: {PREDICATE_KEYS}"
            )
        for key, want in predicate.items():
            have = self.rank if key == "rank" else getattr(self.spec, key)
            if not (have in want if isinstance(want, (list, tuple, set)) else have == want):
                return False
        return True


def candidate_grid(
    formats=("int", "nf"),
    bits=(2, 3, 4, 8),
    group_sizes=(32, 64, 128),
    ranks=(0, 8, 16, 32, 64),
    *,
    base: QuantSpec | None = None,
    symmetric: tuple[bool, ...] = (),
) -> list[Candidate]:
    """Every (format, bits, group size, symmetry, rank) combination, ranks innermost.

    formats: families ("int" -> int{b}, "nf" -> nf{b}, "fp" -> fp{b}_*, only where FORMATS has that
    width) or exact FORMATS names (taken when their width is in `bits`). group_sizes may hold None
    (per-channel). base: the other spec fields (symmetric, scale_dtype, double_quant); default QuantSpec().
    symmetric: the variants of formats that have both (INT: without zero points, b bits per group less);
    empty: base's. A format without the variant (NF, FP) appears once. Ranks above min(N, K) of a matrix
    are marked inapplicable by `error_row`, not dropped here.
    """
    base = base or QuantSpec()
    names = []
    for f in formats:
        family = [n for n, info in FORMATS.items() if info.kind == f or n == f]
        if not family:
            raise AllocationError(
                f"unknown format {f!r}; use a family (int, nf, fp) or one of {', '.join(FORMATS)}"
            )
        names += [n for b in bits for n in family if FORMATS[n].bits == b and n not in names]
    try:
        specs = [
            QuantSpec(n, g, sym, base.scale_dtype, base.double_quant)
            for n in names
            for g in group_sizes
            for sym in symmetric or (base.symmetric,)
        ]
    except SpecError as e:
        raise AllocationError(f"bad candidate grid: {e}") from None
    # formats that fix their group (K-quants) give one spec per format; NF / FP specs are symmetric
    # either way: keep one of each
    specs = list(dict.fromkeys(specs))
    grid = [Candidate(s, r) for s in specs for r in ranks]
    if not grid:
        raise AllocationError("the candidate grid is empty (no format has any of the requested bit widths)")
    return grid


def candidate_bits(cand: Candidate, shape, lowrank_dtype_bits: int = 32, smooth: bool = False) -> int:
    """Exact stored bits of W [N, K] as `cand`: storage_bits(spec) + r (N + K) factor entries (+ K smoothing).

    lowrank_dtype_bits: bits of one L1 / L2 (and smoothing) entry, the model's weight dtype (32 for fp32,
    16 for fp16 / bf16).
    """
    bits = storage_bits(cand.spec, shape)  # validates shape
    n, k = shape
    return bits + (cand.rank * (n + k) + (k if smooth else 0)) * lowrank_dtype_bits


def budget_bits(budget_bpw: float, params: int) -> int:
    """The ILP's budget B in bits for an average of `budget_bpw` bits over `params` quantized weights."""
    if not (isinstance(budget_bpw, (int, float)) and math.isfinite(budget_bpw) and budget_bpw > 0):
        raise AllocationError(f"budget must be a positive number of bits per weight, got {budget_bpw!r}")
    return round(budget_bpw * params)
