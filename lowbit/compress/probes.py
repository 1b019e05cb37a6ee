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

Check. After the allocated layers are rounded, the model's mean next-token loss on the calibration
blocks is compared with that of the best uniform spec whose size fits the budget (rounded the same way);
the budget path keeps the uniform plan when the allocation is worse.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lowbit.calibration.stats import find_blocks
from lowbit.compress.allocate import ErrorTable, budget_bits
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
