"""The per-layer plan: what the pipeline does to one linear layer, one type for both compression paths.

A `LayerChoice` says how W [N, K] becomes Q + L1 L2: the format of Q (a QuantSpec), the rank r of the
low-rank part, the decomposition method (a key of `lowbit.lowrank.METHODS`) and the rounding of Q
("nearest" or a GPTQ variant). A uniform recipe is a plan with the recipe's one choice per layer
(`uniform_choice`); a budget run's plan is the allocation's candidate per layer with the method and
rounding of the recipe (`allocated_choice`). Both paths build every layer with `apply_choice`, given the
layer's calibration statistics and, for SVDQuant layers whose smoothing is shared by the readers of a
norm, that shared vector and whether it was folded into the norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.compress.allocate import Candidate
from lowbit.compress.recipe import Recipe, RecipeError
from lowbit.lowrank import METHODS, Decomposition, Stats, decompose
from lowbit.lowrank.svdquant import svdquant_smoothed
from lowbit.nn.qlinear import QLinear
from lowbit.quantizers import SCALE_DTYPES, QuantSpec
from lowbit.quantizers.engines import ENGINES, fused_groups, served_group


@dataclass(frozen=True)
class LayerChoice:
    """How one layer is compressed.

    spec: the format of Q; rank: r of L1 [N, r] L2 [r, K] (0: none); method: a key of METHODS;
    rounding: "nearest" or a GPTQ variant (`lowbit.lowrank.ROUNDINGS`).
    """

    spec: QuantSpec
    rank: int = 0
    method: str = "none"
    rounding: str = "nearest"


def uniform_choice(recipe: Recipe, name: str, in_features: int) -> LayerChoice | None:
    """The recipe's single setting for layer `name` of `in_features` inputs (overrides applied), or None
    when it stays dense. For a recipe made for a serving engine (`recipe.target`), a group size that the
    engine does not serve on this layer falls back to the largest it serves that divides in_features
    (e.g. g128 on K = 576 -> g64 for vLLM); the manifest's per-layer plan records the group used."""
    cfg = recipe.layer_config(name)
    if cfg is None:
        return None
    spec = served_group(recipe.target, cfg.spec(), in_features)
    return LayerChoice(spec, recipe.decompose.rank, recipe.decompose.method, cfg.rounding)


def allocation_method(recipe: Recipe) -> str:
    """The decomposition behind an allocation: the recipe's, or LoRC when ranks compete without one."""
    method = recipe.decompose.method
    return "lorc" if method == "none" and any(recipe.allocate.ranks) else method


def allocated_choice(candidate: Candidate, recipe: Recipe) -> LayerChoice:
    """The choice for a layer allocated `candidate`: its spec and rank, the recipe's method and rounding."""
    return LayerChoice(candidate.spec, candidate.rank, allocation_method(recipe), recipe.quantize.rounding)


def qlinear_of(linear: nn.Linear, d: Decomposition, recipe: Recipe, keep_smooth: bool = True) -> QLinear:
    """The QLinear holding decomposition d of `linear`: low-rank factors in the recipe's lowrank_dtype,
    the smoothing vector (when kept) in the weight's dtype."""
    lowrank = SCALE_DTYPES[recipe.decompose.lowrank_dtype]
    smooth = d.smooth if keep_smooth else None
    return QLinear.from_linear(
        linear,
        d.q,
        None if d.l1 is None else d.l1.to(lowrank),
        None if d.l2 is None else d.l2.to(lowrank),
        None if smooth is None else smooth.to(linear.weight.dtype),
    )


def apply_choice(
    linear: nn.Linear,
    choice: LayerChoice,
    recipe: Recipe,
    stats: Stats | None = None,
    shared: tuple[torch.Tensor | None, bool] | None = None,
) -> QLinear:
    """The QLinear for `linear` under `choice`: W [N, K] decomposed into Q + L1 L2 by its method.

    stats: the layer's calibration statistics (Hessian, activation magnitudes, Fisher).
    shared: (lambda [K] or None, folded) when the layer's SVDQuant smoothing is shared with the other
    readers of one norm: the layer is decomposed in the smoothed domain W diag(lambda) (None: no
    smoothing), and stores lambda unless it was folded into the norm.
    """
    stats = stats or Stats()
    W = linear.weight.detach()  # its own dtype: decompose converts what it needs to float32
    if shared is not None:
        lam, folded = shared
        d = svdquant_smoothed(W.float(), choice.spec, choice.rank, lam, stats, choice.rounding)
        return qlinear_of(linear, d, recipe, keep_smooth=not folded)
    method = choice.method if choice.rank or METHODS[choice.method].at_rank_zero else "none"
    d = decompose(
        W,
        choice.spec,
        choice.rank,
        method,
        H=stats.H,
        act_max=stats.act_max,
        fisher=stats.fisher,
        rounding=choice.rounding,
        iterations=recipe.decompose.iterations,
    )
    return qlinear_of(linear, d, recipe)


def check_fused(recipe: Recipe, model: nn.Module) -> None:
    """Refuse a uniform recipe for an engine that fuses q/k/v and gate/up (vLLM) when the layers of such a
    group would not share one choice (an override or exclusion matching some of them). Reads no weight."""
    if not ENGINES[recipe.target].fused:
        return
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for group in fused_groups(linears):
        choices = {uniform_choice(recipe, n, linears[n].in_features) for n in group}
        if len(choices) > 1:
            raise RecipeError(
                f"target {recipe.target} runs {', '.join(group)} as one matrix: the recipe (overrides, "
                "exclude) must give them one setting"
            )
