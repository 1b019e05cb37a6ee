"""The error table: every matrix's error and exact size under every candidate (the decompose stage's
result, cached so that a new budget needs no recalibration)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lowbit.compress.allocate.candidates import AllocationError, Candidate, budget_bits, candidate_bits
from lowbit.compress.allocate.constraints import constraint_mask
from lowbit.compress.allocate.solve import SOLVERS, Allocation
from lowbit.lowrank import Stats, decompose, errors, svd_r
from lowbit.lowrank.decomposition import quantize_step
from lowbit.quantizers import QuantSpec, dequantize

METRICS = {"frobenius": "frobenius_error", "output": "output_error", "fisher": "fisher_error"}
TABLE_VERSION = 1
TABLE_KEY = "lowbit_error_table"


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
