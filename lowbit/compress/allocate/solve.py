"""The solvers of the allocation problem (formulated in the package docstring): `allocate`, the LQ-LoRA
ILP solved exactly by PuLP's bundled CBC, and `allocate_greedy`, the Lagrangian baseline it is measured
against. Both are pure functions over errors [M, C] and sizes [M, C], with optional ties: groups of
matrices that must take the same candidate (an engine that runs q/k/v or gate/up as one fused matrix
serves one scheme for all of them). A tied group is solved as one row whose error and size are its
members' sums and whose allowed candidates are those every member allows; this is the ILP with the
constraints x[m, c] = x[m', c] for m, m' in a group, with fewer variables."""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pulp

from lowbit.compress.allocate.candidates import AllocationError

logger = logging.getLogger(__name__)

# Of allocate's time limit, what writing the problem for CBC and reading it back take (a shared machine
# can be slow), and the least search time CBC gets however late it starts.
IO_SECONDS = 1.5
MIN_SOLVE_SECONDS = 0.5


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


def _tie(E, S, ok, tied) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(E', S', ok' over the groups [G, C], owner int64 [M]: each matrix's group) with every tied group of
    row indices merged into one row (sums of E and S, ok of all members) and every other matrix alone."""
    M = E.shape[0]
    owner = np.full(M, -1)
    for g, rows in enumerate(tied or ()):
        rows = np.asarray(rows)
        bad = rows.ndim != 1 or rows.size == 0 or rows.dtype.kind not in "iu"
        if bad or rows.min() < 0 or rows.max() >= M:
            raise AllocationError(f"tied group {g} must be a non-empty list of matrix indices below {M}")
        if (owner[rows] >= 0).any() or len(set(rows.tolist())) < rows.size:
            raise AllocationError(f"tied group {g} repeats a matrix already tied")
        owner[rows] = g
    alone = np.flatnonzero(owner < 0)
    owner[alone] = len(tied or ()) + np.arange(alone.size)
    G = int(owner.max()) + 1
    C = E.shape[1]
    E2, S2, ok2 = np.zeros((G, C)), np.zeros((G, C), np.int64), np.ones((G, C), bool)
    np.add.at(E2, owner, np.where(ok, E, 0.0))
    np.add.at(S2, owner, S)
    np.logical_and.at(ok2, owner, ok)
    empty = np.flatnonzero(~ok2.any(1))
    if empty.size:
        members = np.flatnonzero(owner == empty[0]).tolist()
        raise AllocationError(f"the matrices {members} tied together have no candidate allowed for all")
    return E2, S2, ok2, owner


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
    errors, sizes, budget_bits: int, *, allowed=None, params: int | None = None, tied=None
) -> Allocation:
    """Lagrangian baseline: bisect lambda on min_c E[m, c] + lambda S[m, c] per matrix until the choice fits
    the budget, then greedily upgrade matrices while bits remain. Fast; no optimality guarantee.
    tied: groups of matrix indices that take one candidate (see the module docstring)."""
    t0 = time.perf_counter()
    E0, S0, ok0 = _problem(errors, sizes, allowed)
    E, S, ok, owner = _tie(E0, S0, ok0, tied)
    budget = _check_budget(S, ok, budget_bits, params)
    keep = _pareto(E, S, ok)
    choice = _fill(E, S, keep, budget, _lagrangian(E, S, keep, budget))
    return _result(E0, S0, choice[owner], budget, t0, "greedy")


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
    tied=None,
) -> Allocation:
    """The LQ-LoRA allocation ILP: one candidate per matrix, total size <= budget_bits, least total error.

    errors: float [M, C] (inf: candidate not applicable); sizes: int [M, C] bits; allowed: bool [M, C]
    or None (constraint_mask); params: number of weights, only to word errors in bits per weight.
    CBC (PuLP's bundled solver) proves optimality on small problems; time_limit (seconds of wall time
    for the whole call, None: none) and gap (relative) cap large ones, which then return the best
    solution found, never worse than allocate_greedy's (CBC starts from it). Errors are scaled to
    [-1, 1] for the solver; the returned error is in the original units. tied: groups of matrix indices
    (lists of row numbers) that must take the same candidate, e.g. a layer's q, k and v.
    """
    t0 = time.perf_counter()
    E0, S0, ok0 = _problem(errors, sizes, allowed)
    E, S, ok, owner = _tie(E0, S0, ok0, tied)
    budget = _check_budget(S, ok, budget_bits, params)
    keep = _pareto(E, S, ok)
    rows = np.arange(E.shape[0])
    best = np.where(keep, E, np.inf).argmin(1)  # the most accurate candidate of each matrix
    if int(S[rows, best].sum()) <= budget:
        return _result(E0, S0, best[owner], budget, t0, "optimal")
    start = _fill(E, S, keep, budget, _lagrangian(E, S, keep, budget))
    deadline = None if time_limit is None else t0 + time_limit
    choice, status = _solve_ilp(E, S, keep, budget, start, deadline, gap)
    if choice is None or E[rows, choice].sum() > E[rows, start].sum():
        logger.warning("ILP solver gave no better solution (%s); keeping the greedy one", status)
        choice, status = start, "greedy"
    return _result(E0, S0, choice[owner], budget, t0, status)


SOLVERS = {"ilp": allocate, "greedy": allocate_greedy}
