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
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from lowbit.calibration.stats import find_blocks
from lowbit.compress.allocate import Allocation, Candidate, ErrorTable, budget_bits
from lowbit.lowrank import Stats, decompose
from lowbit.nn.qlinear import set_submodule
from lowbit.quantizers.clip import nearest


@torch.no_grad()
def calibration_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of `model` on token blocks [S, L]."""
    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        ids = blocks[i : i + batch_size].to(device)  # [B, L]
        logits = model(ids).logits[:, :-1].float()  # [B, L-1, V]
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        count += ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def probe_factors(
    model: nn.Module, linears: dict[str, nn.Linear], table: ErrorTable, blocks: torch.Tensor, probes: int
) -> np.ndarray:
    """k [C] per candidate (module docstring): its spec's measured loss increase over the table's
    estimate on `probes` decoder blocks, round to nearest; 1 where the spec has no finite rank-0 error.
    The layers' weights are restored."""
    prefix, decoder = find_blocks(model)
    picks = np.unique(np.linspace(0, len(decoder) - 1, probes).round().astype(int))
    rows = [
        [i for i, name in enumerate(table.names) if name.startswith(f"{prefix}.{b}.") and name in linears]
        for b in picks
    ]
    base = calibration_loss(model, blocks)
    ratio = {}
    for c, cand in enumerate(table.candidates):
        if cand.rank or cand.spec in ratio or not bool(table.errors[:, c].isfinite().all()):
            continue
        measured = estimated = 0.0
        for members in rows:
            W0 = {i: linears[table.names[i]].weight.data for i in members}
            try:
                for i, W in W0.items():
                    linears[table.names[i]].weight.data = nearest(W.float(), cand.spec).to(W.dtype)
                measured += calibration_loss(model, blocks) - base
            finally:
                for i, W in W0.items():
                    linears[table.names[i]].weight.data = W
            estimated += float(table.errors[members, c].sum())
        ratio[cand.spec] = measured / estimated if estimated > 0 else 1.0
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


def loss_with(model: nn.Module, layers: dict[str, nn.Module], blocks: torch.Tensor) -> float:
    """calibration_loss with `layers` swapped in by name; the modules there before are put back."""
    before = {name: model.get_submodule(name) for name in layers}
    try:
        for name, m in layers.items():
            set_submodule(model, name, m)
        return calibration_loss(model, blocks)
    finally:
        for name, m in before.items():
            set_submodule(model, name, m)


def penalized(table: ErrorTable, bits: int, penalty: float) -> ErrorTable:
    """The table with the errors of every candidate of fewer than `bits` bits multiplied by `penalty`."""
    low = [c.spec.bits < bits for c in table.candidates]
    return corrected(table, np.where(low, penalty, 1.0))


@torch.no_grad()
def plan_loss(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    plan: dict[str, Candidate],
    blocks: torch.Tensor,
    method: str,
    stats: dict[str, Stats] | None = None,
) -> float:
    """calibration_loss with every layer's weight replaced by its planned candidate, rounded to nearest
    (W_hat = Q + L1 L2 of `decompose(W, spec, rank, method)`); the weights are restored."""
    W0 = {name: lin.weight.data for name, lin in linears.items()}
    try:
        for name, lin in linears.items():
            c, st = plan[name], (stats or {}).get(name, Stats())
            d = decompose(W0[name].float(), c.spec, c.rank, method, H=st.H, act_max=st.act_max)
            lin.weight.data = d.weight().to(W0[name].dtype)
        return calibration_loss(model, blocks)
    finally:
        for name, W in W0.items():
            linears[name].weight.data = W


def penalty_search(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    table: ErrorTable,
    solve,
    penalties: tuple[float, ...],
    bits: int,
    blocks: torch.Tensor,
    stats: dict[str, Stats] | None = None,
) -> tuple[dict[str, Candidate], Allocation, dict[str, float]]:
    """(plan, allocation, {f"penalty-{p:g}": measured loss}) of the penalty among 1 and `penalties`
    whose plan has the lowest `plan_loss` (module docstring); the allocation's error is in the unpenalised
    table's units. solve: ErrorTable -> (plan, Allocation), the budget's ILP; a plan equal to one already
    measured is not measured again."""
    method = table.info.get("method", "none")
    best, losses, seen = None, {}, {}
    for p in dict.fromkeys((1.0, *penalties)):
        plan, alloc = solve(penalized(table, bits, p))
        key = tuple(int(c) for c in alloc.choice)
        if key not in seen:
            seen[key] = plan_loss(model, linears, plan, blocks, method, stats)
        losses[f"penalty-{p:g}"] = seen[key]
        if best is None or seen[key] < best[2]:
            error = float(table.errors[torch.arange(len(key)), torch.as_tensor(key)].sum())
            best = (plan, replace(alloc, error=error), seen[key])
    return best[0], best[1], losses
