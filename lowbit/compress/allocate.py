"""Bit allocation: one (format, bits, group size, rank) configuration per weight matrix under a size budget.

LQ-LoRA (Guo et al. 2023, sec. 3.3, the ILP for mixed configuration) chooses every matrix's quantization
configuration by an integer linear program; here a candidate also carries the rank r of the high-precision
low-rank part L1 L2. With E[m, c] the error of matrix m decomposed by candidate c (a sum of squares:
Frobenius, output or Fisher-weighted, so errors add over matrices) and S[m, c] its exact storage in bits:

    minimise  sum_{m,c} E[m, c] x[m, c]
    s.t.      sum_c x[m, c] = 1 for every m,   sum_{m,c} S[m, c] x[m, c] <= B,   x[m, c] in {0, 1}

solved exactly by PuLP's bundled CBC, with B = round(budget_bpw * number of quantized weights).
`allocate_greedy` (Lagrangian relaxation plus a greedy fill) is the baseline the ILP is measured against.

    table = error_table(weights, candidate_grid(), method="lqlora")   # the expensive part; cache it
    table.save(out / "error_table.safetensors")
    alloc = table.allocate(3.0)                                        # 3 bits per weight on average
    plan = table.plan(alloc)                                           # {layer name: Candidate}
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pulp
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lowbit.lowrank import Stats, decompose, errors, svd_r
from lowbit.lowrank.decomposition import quantize_step
from lowbit.quantizers import FORMATS, QuantSpec, SpecError, dequantize, storage_bits

logger = logging.getLogger(__name__)

METRICS = {"frobenius": "frobenius_error", "output": "output_error", "fisher": "fisher_error"}
PREDICATE_KEYS = ("format", "kind", "bits", "group_size", "symmetric", "scale_dtype", "double_quant", "rank")
TABLE_VERSION = 1
TABLE_KEY = "lowbit_error_table"
# Of allocate's time limit, what writing the problem for CBC and reading it back take (a shared machine
# can be slow), and the least search time CBC gets however late it starts.
IO_SECONDS = 1.5
MIN_SOLVE_SECONDS = 0.5


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
) -> list[Candidate]:
    """Every (format, bits, group size, rank) combination, ranks innermost.

    formats: families ("int" -> int{b}, "nf" -> nf{b}, "fp" -> fp{b}_*, only where FORMATS has that
    width) or exact FORMATS names (taken when their width is in `bits`). group_sizes may hold None
    (per-channel). base: the other spec fields (symmetric, scale_dtype, double_quant); default QuantSpec().
    Ranks above min(N, K) of a matrix are marked inapplicable by `error_row`, not dropped here.
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
            QuantSpec(n, g, base.symmetric, base.scale_dtype, base.double_quant)
            for n in names
            for g in group_sizes
        ]
    except SpecError as e:
        raise AllocationError(f"bad candidate grid: {e}") from None
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


def _lorc_errors(W, spec, ranks, stats: Stats, key: str, rounding: str) -> list[float]:
    """LoRC errors at every rank from one quantization and one SVD: Q is rank-independent and the rank-r
    truncation of SVD_rmax(W - Q) is SVD_r(W - Q) (exactly so for the full SVD of matrices under 512 wide).

    The output error needs one [N, K] x [K, K] product per spec, not one per rank: with D = W - Q and
    L = L1 L2, tr((D - L) H (D - L)^T) = tr(D H D^T) - 2 <L, D H> + tr(L1 (L2 H L2^T) L1^T).
    """
    W = W.float()
    q = quantize_step(W, spec, rounding, stats.H)
    D = W - dequantize(q)  # [N, K]
    L1, L2 = svd_r(D, max(ranks))  # [N, rmax], [rmax, K]
    if key != "output_error":
        return [errors(W, W - D + L1[:, :r] @ L2[:r], stats.H, stats.fisher)[key] for r in ranks]
    H = stats.H.float()
    DH = D @ H  # [N, K]
    base = float((DH * D).sum())
    out = []
    for r in ranks:
        a, b = L1[:, :r], L2[:r]  # [N, r], [r, K]
        cross = float(((a @ b) * DH).sum())
        quad = float(((a @ (b @ H @ b.T)) * a).sum())
        out.append(base - 2 * cross + quad)
    return out


def error_row(
    W: torch.Tensor,
    candidates: list[Candidate],
    method: str = "lqlora",
    *,
    stats: Stats | None = None,
    metric: str = "frobenius",
    rounding: str = "nearest",
    iterations: int = 20,
    lowrank_dtype_bits: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Errors float64 [C] and exact sizes int64 [C] of one matrix W [N, K] under every candidate.

    An error is decompose(W, spec, rank, method).info[METRICS[metric]]; inf where the candidate does not
    apply (rank > min(N, K), or rank > 0 with method "none"). stats: the layer's H / act_max / fisher.
    """
    if metric not in METRICS:
        raise AllocationError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    stats = stats or Stats()
    if (metric == "output" and stats.H is None) or (metric == "fisher" and stats.fisher is None):
        raise AllocationError(
            f"metric {metric!r} needs the layer's {'H' if metric == 'output' else 'fisher'}"
        )
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise AllocationError(f"W must be a matrix [N, K], got {getattr(W, 'shape', type(W).__name__)}")
    shape = tuple(W.shape)
    key = METRICS[metric]
    errs = np.full(len(candidates), np.inf)
    sizes = np.array([candidate_bits(c, shape, lowrank_dtype_bits) for c in candidates], dtype=np.int64)
    kw = dict(H=stats.H, act_max=stats.act_max, fisher=stats.fisher, rounding=rounding, iterations=iterations)
    by_spec: dict[QuantSpec, list[tuple[int, int]]] = {}
    for i, c in enumerate(candidates):
        if c.rank <= min(shape) and (method != "none" or c.rank == 0):
            by_spec.setdefault(c.spec, []).append((i, c.rank))
    for spec, items in by_spec.items():
        if method == "lorc":
            errs[[i for i, _ in items]] = _lorc_errors(W, spec, [r for _, r in items], stats, key, rounding)
            continue
        for i, r in items:
            d = decompose(W, spec, r, method, **kw)
            errs[i] = d.info[key]
            sizes[i] = candidate_bits(candidates[i], shape, lowrank_dtype_bits, d.smooth is not None)
    return errs, sizes


@dataclass
class ErrorTable:
    """The decompose stage's result: every matrix's error and exact size under every candidate.

    names: M layer names; shapes: M (N, K); candidates: C; errors: float64 [M, C] (inf where a
    candidate does not apply); sizes: int64 [M, C] stored bits; info: how the errors were measured.
    """

    names: list[str]
    shapes: list[tuple[int, int]]
    candidates: list[Candidate]
    errors: torch.Tensor
    sizes: torch.Tensor
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.names, self.candidates = list(self.names), list(self.candidates)
        self.shapes = [(int(n), int(k)) for n, k in self.shapes]
        self.errors = torch.as_tensor(self.errors, dtype=torch.float64)
        self.sizes = torch.as_tensor(self.sizes, dtype=torch.int64)
        M, C = len(self.names), len(self.candidates)
        if len(set(self.names)) != M or len(self.shapes) != M:
            raise AllocationError("error table names must be unique and match the shapes one to one")
        if tuple(self.errors.shape) != (M, C) or tuple(self.sizes.shape) != (M, C):
            raise AllocationError(
                f"error table needs errors and sizes of shape [{M}, {C}], "
                f"got {list(self.errors.shape)} and {list(self.sizes.shape)}"
            )
        if bool(self.errors.isnan().any()):
            raise AllocationError("error table contains NaN errors")

    @property
    def params(self) -> int:
        """Number of weights in the table's matrices, sum of N * K."""
        return sum(n * k for n, k in self.shapes)

    def save(self, path: str | Path) -> None:
        """Write errors and sizes as safetensors, names / shapes / candidates / info as JSON metadata."""
        path = Path(path)
        meta = {
            "version": TABLE_VERSION,
            "names": self.names,
            "shapes": self.shapes,
            "candidates": [c.to_dict() for c in self.candidates],
            "info": self.info,
        }
        tmp = path.with_name(path.name + ".tmp")
        tensors = {"errors": self.errors.contiguous(), "sizes": self.sizes.contiguous()}
        save_file(tensors, str(tmp), metadata={TABLE_KEY: json.dumps(meta)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> ErrorTable:
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(TABLE_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if raw is None:
                raise AllocationError(f"{path} is not an error table (no {TABLE_KEY!r} metadata)")
            meta = json.loads(raw)
            if meta["version"] > TABLE_VERSION:
                raise AllocationError(f"error table version {meta['version']} is newer than this lowbit")
            cands = [Candidate.from_dict(c) for c in meta["candidates"]]
            return cls(
                meta["names"], meta["shapes"], cands, tensors["errors"], tensors["sizes"], meta["info"]
            )
        except AllocationError:
            raise
        except (OSError, SafetensorError, TypeError, KeyError, ValueError) as e:
            raise AllocationError(f"cannot read error table {path}: {str(e).splitlines()[0]}") from None

    def mask(self, pins=None, forbid=(), min_bits=None) -> np.ndarray:
        """constraint_mask over this table's names and candidates."""
        return constraint_mask(self.names, self.candidates, pins=pins, forbid=forbid, min_bits=min_bits)

    def allocate(self, budget_bpw: float, *, allowed=None, solver: str = "ilp", **options) -> Allocation:
        """The best candidate per matrix for an average of `budget_bpw` stored bits per weight."""
        if solver not in SOLVERS:
            raise AllocationError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        budget = budget_bits(budget_bpw, self.params)
        usable = torch.isfinite(self.errors).numpy()
        if allowed is not None and np.shape(allowed) == usable.shape:
            usable &= np.asarray(allowed, dtype=bool)
        empty = np.flatnonzero(~usable.any(1))
        if empty.size:  # named here; allocate() itself only knows row numbers
            raise AllocationError(
                f"layer {self.names[empty[0]]!r} has no allowed candidate with a finite error"
            )
        return SOLVERS[solver](
            self.errors, self.sizes, budget, allowed=allowed, params=self.params, **options
        )

    def plan(self, alloc: Allocation) -> dict[str, Candidate]:
        """{layer name: chosen candidate}."""
        return {n: self.candidates[int(c)] for n, c in zip(self.names, alloc.choice, strict=True)}


def error_table(
    weights: dict[str, torch.Tensor],
    candidates: list[Candidate],
    method: str = "lqlora",
    *,
    stats: dict[str, Stats] | None = None,
    metric: str = "frobenius",
    rounding: str = "nearest",
    iterations: int = 20,
    lowrank_dtype_bits: int = 32,
    progress: bool = False,
) -> ErrorTable:
    """error_row for every named weight W [N, K] (stats: per-layer Stats, needed for the output and
    Fisher metrics, GPTQ rounding and SVDQuant)."""
    if not weights or not candidates:
        raise AllocationError("an error table needs at least one weight matrix and one candidate")
    stats = stats or {}
    info = dict(method=method, metric=metric, rounding=rounding, iterations=iterations)
    info["lowrank_dtype_bits"] = lowrank_dtype_bits
    errs, sizes = [], []
    for name, W in tqdm(weights.items(), desc="error table", disable=not progress):
        try:
            e, s = error_row(W, candidates, stats=stats.get(name), **info)
        except ValueError as err:
            raise AllocationError(f"layer {name!r}: {err}") from None
        errs.append(e)
        sizes.append(s)
    shapes = [tuple(W.shape) for W in weights.values()]
    return ErrorTable(list(weights), shapes, candidates, np.stack(errs), np.stack(sizes), info)


def constraint_mask(names, candidates, *, pins=None, forbid=(), min_bits=None) -> np.ndarray:
    """bool [M, C]: True where layer names[m] may take candidates[c]. Patterns are fnmatch patterns.

    pins: {pattern: Candidate or predicate dict}: matching layers take only that candidate (or those
    matching the predicate); the first matching pattern wins. forbid: [(pattern, predicate)]: matching
    layers never take a candidate matching the predicate, e.g. ("*.down_proj", {"bits": 2}).
    min_bits: {pattern: b}: matching layers take only candidates with at least b-bit codes.
    A predicate maps PREDICATE_KEYS to a value or a list of allowed values.
    """
    mask = np.ones((len(names), len(candidates)), dtype=bool)

    def rows(pattern: str) -> list[int]:
        hit = [m for m, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            logger.warning("allocation constraint pattern %r matches no layer", pattern)
        return hit

    pinned = np.zeros(len(names), dtype=bool)
    for pattern, pin in (pins or {}).items():
        if isinstance(pin, Candidate) and pin not in candidates:
            raise AllocationError(
                f"candidate {pin.short()} pinned for {pattern!r} is not in the candidate grid"
            )
        if not isinstance(pin, (Candidate, dict)):
            raise AllocationError(f"pin for {pattern!r} must be a Candidate or a predicate dict, got {pin!r}")
        col = np.array([c == pin if isinstance(pin, Candidate) else c.matches(pin) for c in candidates])
        for m in rows(pattern):
            if not pinned[m]:
                mask[m] &= col
                pinned[m] = True
    for entry in forbid or ():
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[1], dict)):
            raise AllocationError(
                f"each forbid entry must be a (pattern, predicate dict) pair, got {entry!r}"
            )
        col = np.array([c.matches(entry[1]) for c in candidates])
        mask[rows(entry[0])] &= ~col
    for pattern, b in (min_bits or {}).items():
        if isinstance(b, bool) or not isinstance(b, int):
            raise AllocationError(f"min_bits for {pattern!r} must be an integer, got {b!r}")
        mask[rows(pattern)] &= np.array([c.spec.bits >= b for c in candidates])
    empty = np.flatnonzero(~mask.any(1))
    if empty.size:
        raise AllocationError(f"the allocation constraints leave layer {names[empty[0]]!r} no candidate")
    return mask


@dataclass(frozen=True)
class Allocation:
    """A solution of the allocation problem.

    choice: int64 [M], the chosen candidate (column) of each matrix; error: its total error in the
    table's units; bits: its total stored bits; budget: the budget B in bits; seconds: wall time of the
    solve; status: "optimal", "feasible" (the solver stopped at its time limit) or "greedy".
    """

    choice: np.ndarray
    error: float
    bits: int
    budget: int
    seconds: float
    status: str

    def bits_per_weight(self, params: int) -> float:
        return self.bits / params


def _problem(errors, sizes, allowed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated (E float64 [M, C], S int64 [M, C], usable bool [M, C]): allowed and finite error."""
    E = np.asarray(errors, dtype=np.float64)
    S_raw = np.asarray(sizes)
    if E.ndim != 2 or E.size == 0 or S_raw.shape != E.shape:
        raise AllocationError(
            f"errors and sizes must be non-empty [M, C] of one shape, got {E.shape}, {S_raw.shape}"
        )
    if np.isnan(E).any():
        raise AllocationError("errors contain NaN")
    S = S_raw.astype(np.int64)
    if (S != S_raw).any() or (S < 0).any():
        raise AllocationError("sizes must be non-negative integers (bits)")
    ok = np.isfinite(E)
    if allowed is not None:
        allowed = np.asarray(allowed)
        if allowed.shape != E.shape or allowed.dtype != bool:
            raise AllocationError(f"allowed must be a bool mask of shape {list(E.shape)}")
        ok &= allowed
    empty = np.flatnonzero(~ok.any(1))
    if empty.size:
        raise AllocationError(f"matrix {empty[0]} has no allowed candidate with a finite error")
    return E, S, ok


def _fmt(bits: int, params: int | None) -> str:
    return f"{bits / params:.4f} bits per weight" if params else f"{bits} bits"


def _check_budget(S: np.ndarray, ok: np.ndarray, budget: int, params: int | None) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise AllocationError(f"budget_bits must be an integer number of bits, got {budget!r}")
    lo = int(np.where(ok, S, np.iinfo(np.int64).max).min(1).sum())
    hi = int(np.where(ok, S, -1).max(1).sum())
    if budget < lo:
        raise AllocationError(
            f"budget of {_fmt(int(budget), params)} is infeasible: the allowed candidates need between "
            f"{_fmt(lo, params)} (smallest) and {_fmt(hi, params)} (largest)"
        )
    return int(budget)


def _pareto(E: np.ndarray, S: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """bool [M, C]: usable candidates that no other is at least as small and as accurate as (ties: first).

    Dropping dominated candidates never changes the optimum (swap one for its dominator); what is
    left has strictly increasing size and strictly decreasing error in every row.
    """
    keep = np.zeros_like(ok)
    for m in range(E.shape[0]):
        cols = np.flatnonzero(ok[m])
        order = cols[np.lexsort((cols, E[m, cols], S[m, cols]))]
        e = E[m, order]
        prev = np.concatenate(([np.inf], np.minimum.accumulate(e)[:-1]))
        keep[m, order[e < prev]] = True
    return keep


def _result(E, S, choice, budget, t0, status) -> Allocation:
    rows = np.arange(E.shape[0])
    seconds = time.perf_counter() - t0
    alloc = Allocation(
        choice.astype(np.int64),
        float(E[rows, choice].sum()),
        int(S[rows, choice].sum()),
        budget,
        seconds,
        status,
    )
    logger.info(
        "allocation (%s): %d matrices, error %.6g, %d / %d bits, %.2f s",
        status,
        len(rows),
        alloc.error,
        alloc.bits,
        budget,
        seconds,
    )
    return alloc


def _lagrangian(E: np.ndarray, S: np.ndarray, keep: np.ndarray, budget: int) -> np.ndarray:
    """argmin_c E + lambda S per matrix for the smallest lambda >= 0 (bisected) whose choice fits."""
    rows = np.arange(E.shape[0])
    e = np.where(keep, E / (np.abs(E[keep]).max() or 1.0), np.inf)
    s = S / max(budget / E.shape[0], 1.0)

    def pick(lam: float) -> np.ndarray:
        return np.argmin(e + lam * s, axis=1)

    def fits(choice: np.ndarray) -> bool:
        return int(S[rows, choice].sum()) <= budget

    if fits(pick(0.0)):
        return pick(0.0)
    lo, hi = 0.0, 1.0
    while not fits(pick(hi)):  # ends: at a large enough lambda every matrix takes its smallest candidate
        if hi > 1e100:
            return np.where(keep, S, np.iinfo(np.int64).max).argmin(1)
        lo, hi = hi, hi * 16.0
    for _ in range(60):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 16.0
        lo, hi = (lo, mid) if fits(pick(mid)) else (mid, hi)
    return pick(hi)


def _fill(E: np.ndarray, S: np.ndarray, keep: np.ndarray, budget: int, choice: np.ndarray) -> np.ndarray:
    """Greedy repair: spend the bits left under the budget on the upgrade with the best error drop per bit."""
    rows = np.arange(E.shape[0])
    choice = choice.copy()
    while True:
        room = budget - int(S[rows, choice].sum())
        gain = np.where(keep, E[rows, choice][:, None] - np.where(keep, E, 0.0), -np.inf)  # [M, C]
        cost = S - S[rows, choice][:, None]  # [M, C]; kept rows: a gain costs > 0 bits
        ok = (gain > 0) & (cost <= room) & (cost > 0)
        if not ok.any():
            return choice
        m, c = np.unravel_index(np.argmax(np.where(ok, gain / np.maximum(cost, 1), -np.inf)), E.shape)
        choice[m] = c


def allocate_greedy(
    errors, sizes, budget_bits: int, *, allowed=None, params: int | None = None
) -> Allocation:
    """Lagrangian baseline: bisect lambda on min_c E[m, c] + lambda S[m, c] per matrix until the choice fits
    the budget, then greedily upgrade matrices while bits remain. Fast; no optimality guarantee."""
    t0 = time.perf_counter()
    E, S, ok = _problem(errors, sizes, allowed)
    budget = _check_budget(S, ok, budget_bits, params)
    keep = _pareto(E, S, ok)
    return _result(E, S, _fill(E, S, keep, budget, _lagrangian(E, S, keep, budget)), budget, t0, "greedy")


def _solve_ilp(E, S, keep, budget, start, deadline, gap) -> tuple[np.ndarray | None, str]:
    """The ILP over kept candidates with CBC, warm-started from `start` and stopped by `deadline`
    (a perf_counter time, or None); returns (choice [M] or None, status)."""
    rows, cols = np.nonzero(keep)
    smin = np.where(keep, S, np.iinfo(np.int64).max).min(1)  # [M]
    extra = S[rows, cols] - smin[rows]  # bits above each matrix's smallest candidate, >= 0
    g = int(np.gcd.reduce(extra)) or 1  # exact rescaling keeps the budget row's coefficients small
    prob = pulp.LpProblem("allocate", pulp.LpMinimize)
    x = [prob.add_variable(f"x_{m}_{c}", 0, 1, cat="Binary") for m, c in zip(rows, cols, strict=True)]
    scale = float(np.abs(E[rows, cols]).max()) or 1.0  # objective coefficients in [-1, 1] for CBC
    prob.setObjective(pulp.LpAffineExpression(zip(x, (E[rows, cols] / scale).tolist(), strict=True)))
    for m in range(E.shape[0]):
        prob.addConstraint(pulp.lpSum(x[i] for i in np.flatnonzero(rows == m)) == 1, f"one_{m}")
    size = pulp.LpAffineExpression(zip(x, (extra // g).tolist(), strict=True))
    prob.addConstraint(size <= (budget - int(smin.sum())) // g, "budget")
    for v, m, c in zip(x, rows, cols, strict=True):
        v.setInitialValue(1 if start[m] == c else 0)
    limit = None if deadline is None else max(MIN_SOLVE_SECONDS, deadline - time.perf_counter() - IO_SECONDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # PuLP 3.x announces changes to its CBC wrapper
        prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=limit, gapRel=gap, warmStart=True))
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return None, pulp.LpSolution.get(prob.sol_status, "no solution")
    val = np.array([v.varValue or 0.0 for v in x])
    choice = np.full(E.shape[0], -1)
    choice[rows[val > 0.5]] = cols[val > 0.5]
    if (choice < 0).any() or int(S[np.arange(len(choice)), choice].sum()) > budget:
        return None, "solution violates the constraints"
    return choice, "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "feasible"


def allocate(
    errors,
    sizes,
    budget_bits: int,
    *,
    allowed=None,
    params: int | None = None,
    time_limit: float | None = 6.0,
    gap: float | None = None,
) -> Allocation:
    """The LQ-LoRA allocation ILP: one candidate per matrix, total size <= budget_bits, least total error.

    errors: float [M, C] (inf: candidate not applicable); sizes: int [M, C] bits; allowed: bool [M, C]
    or None (constraint_mask); params: number of weights, only to word errors in bits per weight.
    CBC (PuLP's bundled solver) proves optimality on small problems; time_limit (seconds of wall time
    for the whole call, None: none) and gap (relative) cap large ones, which then return the best
    solution found, never worse than allocate_greedy's (CBC starts from it). Errors are scaled to
    [-1, 1] for the solver; the returned error is in the original units.
    """
    t0 = time.perf_counter()
    E, S, ok = _problem(errors, sizes, allowed)
    budget = _check_budget(S, ok, budget_bits, params)
    keep = _pareto(E, S, ok)
    rows = np.arange(E.shape[0])
    best = np.where(keep, E, np.inf).argmin(1)  # the most accurate candidate of each matrix
    if int(S[rows, best].sum()) <= budget:
        return _result(E, S, best, budget, t0, "optimal")
    start = _fill(E, S, keep, budget, _lagrangian(E, S, keep, budget))
    deadline = None if time_limit is None else t0 + time_limit
    choice, status = _solve_ilp(E, S, keep, budget, start, deadline, gap)
    if choice is None or E[rows, choice].sum() > E[rows, start].sum():
        logger.warning("ILP solver gave no better solution (%s); keeping the greedy one", status)
        choice, status = start, "greedy"
    return _result(E, S, choice, budget, t0, status)


SOLVERS = {"ilp": allocate, "greedy": allocate_greedy}
