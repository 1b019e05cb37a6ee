"""SVDQuant smoothing folded into the norm that feeds a layer (Li et al. 2024, sec. 4; SmoothQuant, Xiao
et al. 2023, folds its smoothing into the preceding LayerNorm the same way).

A layer smoothed by lambda [K] computes (x / lambda) W'^T with W' = W diag(lambda). When x is exactly the
output of a norm, x / lambda = (norm.weight / lambda) * normalized(x) (+ norm.bias / lambda for a
LayerNorm), so lambda folds into the norm and the layer stores no smoothing vector. Every other linear
reading that norm then sees x / lambda too: the readers share one lambda
(`lowbit.lowrank.svdquant.shared_smoothing`) and a dense reader takes W diag(lambda).

`lowbit.nn.smoothing` finds which linears read which norm and folds a lambda into one; `norm_groups` picks
the norms whose readers may share a lambda; `fold_group` folds one group, checked;
`compress_norm_groups` is the uniform pipeline's SVDQuant step for one decoder block (the budget path
does the same with each layer's allocated spec and rank, `lowbit.compress.budget.smoothing_stage`);
The export
(`lowbit.export.fit`) folds a checkpoint's shared smoothing with the same helpers.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.compress.plan import apply_choice, uniform_choice
from lowbit.compress.recipe import Recipe
from lowbit.lowrank import Stats
from lowbit.lowrank.svdquant import shared_smoothing
from lowbit.nn.qlinear import set_submodule
from lowbit.nn.smoothing import fold_into_norm


def norm_groups(model: nn.Module, readers: dict, layers) -> dict[str, list[str]]:
    """{norm: its readers among `layers`} for each norm read by one of `layers` whose other readers are
    all dense nn.Linear (those take W diag(lambda) when lambda is folded into the norm)."""
    groups = {}
    for norm, (names, _) in readers.items():
        members = [n for n in names if n in layers]
        others = [model.get_submodule(n) for n in names if n not in members]
        if members and all(isinstance(m, nn.Linear) for m in others):
            groups[norm] = members
    return groups


def fold_group(
    model: nn.Module,
    norm: str,
    readers: dict,
    members: list[str],
    lam: torch.Tensor,
    teacher: nn.Module | None = None,
) -> bool:
    """Fold lam into `norm`, its readers outside `members` taking W diag(lam); False when it cannot fold.

    The teacher (the original model kept for fine-tuning) gets the same fold with every reader dense, so
    it computes what it did, with weights W diag(lambda) in the domain of the quantized layers.
    """
    names, x = readers[norm]
    dense = [model.get_submodule(n) for n in names if n not in members]
    folded = fold_into_norm(model.get_submodule(norm), x, lam, dense)
    if folded and teacher is not None:
        fold_into_norm(teacher.get_submodule(norm), x, lam, [teacher.get_submodule(n) for n in names])
    return folded


def compress_norm_groups(
    model: nn.Module,
    readers: dict[str, tuple[list[str], torch.Tensor]],
    linears: dict[str, nn.Linear],
    block_stats: dict,
    recipe: Recipe,
    teacher: nn.Module | None = None,
) -> set[str]:
    """SVDQuant, with one lambda per norm folded into it, of the linears of one decoder block that read a
    norm's output; returns the names compressed (the caller compresses the block's other layers alone).

    readers: from `norm_readers`; linears: the layers the recipe quantizes; block_stats: {name: LayerStats}
    of the block. A norm's dense readers that the recipe leaves out take W diag(lambda). A norm read by a
    layer that is neither (a QLinear already) is skipped.
    """
    done = set()
    rank = recipe.decompose.rank
    for norm, members in norm_groups(model, readers, [n for n in linears if n in block_stats]).items():
        st = block_stats[members[0]]  # the members read one input: their statistics agree
        stats = Stats(H=st.hessian_matrix(), act_max=st.act_max)
        choices = [uniform_choice(recipe, n, linears[n].in_features) for n in members]
        Ws = [linears[n].weight.detach().float() for n in members]  # W_i [N_i, K], as calibrated
        lam, _ = shared_smoothing(Ws, [c.spec for c in choices], [rank] * len(Ws), stats)
        folded = lam is not None and fold_group(model, norm, readers, members, lam, teacher)
        for name, choice in zip(members, choices, strict=True):
            set_submodule(model, name, apply_choice(linears[name], choice, recipe, stats, (lam, folded)))
        done.update(members)
    return done
