"""Keeping the allocation truthful at low bits: measured probes that rescale the error table, and the
check of the allocated model against the best uniform spec.

Probes. The table's Fisher error sum_ij F_ij D_ij^2 is a second-order estimate of the loss increase
(LQ-LoRA, Guo et al. 2024, sec. 3.3; the Optimal Brain Surgeon expansion dL ~ 1/2 d^T F d). It holds for
small errors and underrates large ones: at 2 bits the allocation believed it and broke down. For each
spec c of the grid, a few decoder blocks b (spread over the depth) get every selected layer rounded to
c, the calibration loss is measured, and the spec's column is rescaled by

    k_c = sum_b (L(b at c) - L) / sum_b sum_{l in b} e_{l,c},

the measured over the estimated increase, so the ILP adds up errors in units of measured loss with each
spec's own bias removed (a correction fitted on measured probes; the ranks of one spec share its k_c).

Penalty search. The probes see one block at a time; at budgets that need many two-bit layers the loss
grows faster than the sum of the layers' errors (their errors compound through the blocks after them),
and the ILP, adding errors, takes too many. For each penalty p of a short list, the candidates with fewer
bits than the reference width (quantize's) get their errors multiplied by p, the ILP allocates, and the
allocated model (every layer rounded to nearest, its low-rank part fitted as the table's method does) is
measured by its calibration loss; the plan with the lowest loss is kept. p = 1 is the table as it is,
so the search never keeps a plan whose measured loss is above the unpenalised one's.

Check. After the allocated layers are rounded, the model's mean next-token loss on the calibration
blocks is compared with that of the best uniform spec whose size fits the budget (rounded the same way);
the budget path keeps the uniform plan when the allocation is worse.

Each measured model is a `lowbit.compress.losses.Variant` of the float one; `run` measures a set of them
(default: the model in memory, `in_memory_losses`; a streamed source: `streamed_losses`, one decoder
block at a time, with the same numbers).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from lowbit.calibration.stats import find_blocks
from lowbit.compress.allocate import Allocation, Candidate, ErrorTable, budget_bits
from lowbit.compress.losses import Runner, Variant, block_layers, in_memory_losses, replaced_weights
from lowbit.lowrank import Stats, decompose
from lowbit.quantizers.clip import nearest


def _probe(linears: dict[str, nn.Linear], members: list[str], block: int, spec) -> Variant:
    """The float model with the layers `members` of decoder block `block` rounded to nearest at `spec`."""

    def swap(index: int | None):
        chosen = {name: linears[name] for name in members} if index == block else {}
        return replaced_weights(chosen, lambda name, W: nearest(W.float(), spec).to(W.dtype))

    return Variant(block, swap)


@torch.no_grad()
def probe_factors(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    table: ErrorTable,
    blocks: torch.Tensor,
    probes: int,
    run: Runner | None = None,
) -> np.ndarray:
    """k [C] per candidate (module docstring): its spec's measured loss increase over the table's
    estimate on `probes` decoder blocks, round to nearest; 1 where the spec has no finite rank-0 error.
    The layers' weights are restored. run: measures the variants (default: the model in memory)."""
    run = run or functools.partial(in_memory_losses, model)
    prefix, decoder = find_blocks(model)
    picks = [int(b) for b in np.unique(np.linspace(0, len(decoder) - 1, probes).round().astype(int))]
    rows = [
        [i for i, name in enumerate(table.names) if name.startswith(f"{prefix}.{b}.") and name in linears]
        for b in picks
    ]
    specs = {}  # spec -> its first rank-0 candidate with finite errors
    for c, cand in enumerate(table.candidates):
        if not cand.rank and cand.spec not in specs and bool(table.errors[:, c].isfinite().all()):
            specs[cand.spec] = c
    variants = {"float": Variant(len(decoder))}
    for spec in specs:
        for b, members in zip(picks, rows, strict=True):
            names = [table.names[i] for i in members]
            variants[f"probe-{spec.short()}-block{b}"] = _probe(linears, names, b, spec)
    losses = run(blocks, variants)
    base = losses["float"]
    ratio = {}
    for spec, c in specs.items():
        measured = estimated = 0.0
        for b, members in zip(picks, rows, strict=True):
            measured += losses[f"probe-{spec.short()}-block{b}"] - base
            estimated += float(table.errors[members, c].sum())
        ratio[spec] = measured / estimated if estimated > 0 else 1.0
    # a probe below the loss's noise must not make its spec free: floor at the smallest positive ratio
    floor = min((r for r in ratio.values() if r > 0), default=1.0)
    return np.array([max(ratio.get(cand.spec, 1.0), floor) for cand in table.candidates])


def corrected(table: ErrorTable, factors: np.ndarray) -> ErrorTable:
    """The table with each candidate's column multiplied by its factor [C]."""
    info = {**table.info, "probe_factors": [float(k) for k in factors]}
    errors = table.errors * torch.as_tensor(factors, dtype=torch.float64)[None]
    return ErrorTable(table.names, table.shapes, table.candidates, errors, table.sizes, info)


def best_uniform(table: ErrorTable, budget_bpw: float, allowed: np.ndarray | None = None) -> int | None:
    """The largest rank-0 candidate whose size over every layer fits the budget and that every layer may
    take (allowed [M, C]), the least summed error among equal sizes; or None. The size decides, not the
    table's errors: the check is there for the case where those errors mislead."""
    size = table.sizes.sum(0).numpy()
    ok = np.isfinite(table.errors.numpy()).all(0) & (size <= budget_bits(budget_bpw, table.params))
    ok &= np.array([c.rank == 0 for c in table.candidates])
    if allowed is not None:
        ok &= np.asarray(allowed, dtype=bool).all(0)
    if not ok.any():
        return None
    err = table.errors.numpy().sum(0)
    return max(np.flatnonzero(ok), key=lambda c: (size[c], -err[c]))


def penalized(table: ErrorTable, bits: int, penalty: float) -> ErrorTable:
    """The table with the errors of every candidate of fewer than `bits` bits multiplied by `penalty`."""
    low = [c.spec.bits < bits for c in table.candidates]
    return corrected(table, np.where(low, penalty, 1.0))


def plan_variant(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    plan: dict[str, Candidate],
    method: str,
    stats: dict[str, Stats] | None = None,
) -> Variant:
    """The float model with every layer's weight replaced by its planned candidate, rounded to nearest
    (W_hat = Q + L1 L2 of `decompose(W, spec, rank, method)`)."""
    prefix = find_blocks(model)[0]

    def weight(name: str, W: torch.Tensor) -> torch.Tensor:
        c, st = plan[name], (stats or {}).get(name, Stats())
        return decompose(W.float(), c.spec, c.rank, method, H=st.H, act_max=st.act_max).weight().to(W.dtype)

    def swap(index: int | None):
        return replaced_weights({n: linears[n] for n in block_layers(linears, prefix, index)}, weight)

    return Variant(0, swap)


@torch.no_grad()
def plan_loss(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    plan: dict[str, Candidate],
    blocks: torch.Tensor,
    method: str,
    stats: dict[str, Stats] | None = None,
) -> float:
    """calibration_loss of `plan_variant` for a model in memory; the weights are restored."""
    return in_memory_losses(model, blocks, {"plan": plan_variant(model, linears, plan, method, stats)})[
        "plan"
    ]


def penalty_search(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    table: ErrorTable,
    solve,
    penalties: tuple[float, ...],
    bits: int,
    blocks: torch.Tensor,
    stats: dict[str, Stats] | None = None,
    run: Runner | None = None,
) -> tuple[dict[str, Candidate], Allocation, dict[str, float]]:
    """(plan, allocation, {f"penalty-{p:g}": measured loss}) of the penalty among 1 and `penalties`
    whose plan has the lowest loss of its `plan_variant` (module docstring); the allocation's error is in
    the unpenalised table's units. solve: ErrorTable -> (plan, Allocation), the budget's ILP; every plan
    is solved first, then the distinct ones measured together by `run` (default: the model in memory)."""
    run = run or functools.partial(in_memory_losses, model)
    method = table.info.get("method", "none")
    solved = []
    for p in dict.fromkeys((1.0, *penalties)):
        plan, alloc = solve(penalized(table, bits, p))
        choice = tuple(int(c) for c in alloc.choice)
        solved.append((p, plan, alloc, "plan-" + hashlib.sha256(repr(choice).encode()).hexdigest()[:16]))
    distinct = {key: plan for _, plan, _, key in solved}
    measured = run(
        blocks, {key: plan_variant(model, linears, plan, method, stats) for key, plan in distinct.items()}
    )
    best, losses = None, {}
    for p, plan, alloc, key in solved:
        losses[f"penalty-{p:g}"] = measured[key]
        if best is None or measured[key] < best[2]:
            error = float(table.errors[torch.arange(len(alloc.choice)), torch.as_tensor(alloc.choice)].sum())
            best = (plan, replace(alloc, error=error), measured[key])
    return best[0], best[1], losses
