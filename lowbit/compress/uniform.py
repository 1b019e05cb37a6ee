"""Compression with one setting for every layer, and the pieces the budget path shares with it.

Every linear layer that the recipe selects becomes a `QLinear` holding W ~ Q + L1 L2 (Q packed low-bit
codes, L1 L2 a high-precision low-rank part, optional SVDQuant smoothing). When the recipe's setting
needs calibration statistics (GPTQ rounding, SVDQuant, Fisher-weighted LQ-LoRA), the model is run block
by block and each block is compressed as soon as its statistics are in; the next block then sees the
compressed block's outputs (GPTQ's sequential protocol). SVDQuant's smoothing of the layers that read a
norm's output is shared per norm and folded into the norm's weight (`lowbit.compress.smoothing`); other
layers keep their own in their QLinear. AWQ's scaling and clipping (`lowbit.compress.awq`) run on each
block before its layers are rounded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration import calibrate_sequential, fisher_diagonal
from lowbit.calibration.data import calibration_blocks
from lowbit.compress.awq import activation_scaling
from lowbit.compress.recipe import Recipe
from lowbit.compress.smoothing import compress_norm_groups, qlinear_of
from lowbit.lowrank import METHODS, Stats, decompose
from lowbit.nn.qlinear import QLinear, set_submodule
from lowbit.nn.smoothing import norm_readers


class CompressError(ValueError):
    """The model cannot be compressed as asked (no layer selected, non-finite weights, ...)."""


def select_linears(model: nn.Module, recipe: Recipe) -> dict[str, nn.Linear]:
    """The nn.Linear layers the recipe quantizes, by fully qualified name, in module order."""
    chosen = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and recipe.layer_config(name) is not None
    }
    if not chosen:
        raise CompressError("the recipe selects no linear layer of this model (check 'exclude')")
    for name, m in chosen.items():
        if not torch.isfinite(m.weight).all():
            raise CompressError(f"weight of layer {name!r} contains NaN or Inf")
    return chosen


def compress_layer(name: str, linear: nn.Linear, recipe: Recipe, stats=None, fisher=None) -> QLinear:
    """The QLinear for one layer under the recipe's single setting (stats: the layer's LayerStats)."""
    cfg = recipe.layer_config(name)
    dec = recipe.decompose
    H = None if stats is None else stats.hessian_matrix()
    act_max = None if stats is None else stats.act_max
    stats = Stats(H=H, act_max=act_max, fisher=fisher)
    return decompose_layer(linear, cfg.spec(), dec.rank, dec.method, cfg.rounding, recipe, stats)


def decompose_layer(
    linear: nn.Linear, spec, rank: int, method: str, rounding: str, recipe: Recipe, stats: Stats
) -> QLinear:
    """Decompose one layer's weight W [N, K] into Q + L1 L2 and return the QLinear holding it; the
    low-rank factors are stored in the recipe's decompose.lowrank_dtype."""
    d = decompose(
        linear.weight.detach().float(),
        spec,
        rank,
        method if rank or METHODS[method].at_rank_zero else "none",
        H=stats.H,
        act_max=stats.act_max,
        fisher=stats.fisher,
        rounding=rounding,
        iterations=recipe.decompose.iterations,
    )
    return qlinear_of(linear, d, recipe)


def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    tokenizer=None,
    *,
    calib_data=None,
    progress: bool = True,
    teacher: nn.Module | None = None,
) -> dict[str, dict]:
    """Replace the selected linears of `model` in place by QLinears; return the per-layer plan.

    calib_data: LongTensor [S, L] of token blocks; when None and the recipe needs calibration,
    blocks are drawn from recipe.calibration.data with `tokenizer`. With SVDQuant, the layers that read
    a norm's output share one smoothing vector per norm, folded into the norm's weight (and into the
    teacher's, a copy of the original model kept for fine-tuning); see `lowbit.compress.smoothing`.
    """
    linears = select_linears(model, recipe)
    if not recipe.needs_calibration():
        for name, lin in tqdm(linears.items(), desc="quantize", disable=not progress):
            set_submodule(model, name, compress_layer(name, lin, recipe))
        return {name: model.get_submodule(name).layer_plan() for name in linears}

    if calib_data is None:
        calib_data = calibration_data(recipe, tokenizer)
    fisher, readers = {}, {}
    if "fisher" in METHODS[recipe.decompose.method].needs:
        fisher = fisher_diagonal(model, calib_data, layers=list(linears), progress=progress)
    shared = METHODS[recipe.decompose.method].shares_smoothing
    if shared or recipe.scaling.method != "none":
        readers = norm_readers(model, calib_data[:1, :16].to(model.get_input_embeddings().weight.device))
    smoothed = readers if shared else {}  # the norms SVDQuant folds its smoothing into

    def on_block(index: int, block: nn.Module, block_stats: dict) -> None:
        if scaling is not None:
            scaling(index, block, block_stats)  # AWQ: scales folded into the norms, weights clipped
        done = compress_norm_groups(model, smoothed, linears, block_stats, recipe, teacher)
        for name, stats in block_stats.items():
            if name in linears and name not in done:
                q = compress_layer(name, linears[name], recipe, stats, fisher.get(name))
                set_submodule(model, name, q)

    with activation_scaling(model, readers, linears, recipe, teacher) as scaling:
        calibrate_sequential(
            model,
            calib_data,
            stats=("act", "hessian"),
            layers=list(linears),
            on_block=on_block,
            propagate="quantized",
            keep=False,
            progress=progress,
        )
    return {name: model.get_submodule(name).layer_plan() for name in linears}


def finetune_stage(
    model, teacher, recipe: Recipe, tokenizer, calib_data, progress: bool, state_dir: Path | None = None
) -> dict:
    """Quantization-aware fine-tuning of the compressed model against the original (the teacher);
    returns the new per-layer plan (L4Q merges its low-rank factors). With `state_dir` the run saves
    its state there and a repeated call resumes from it."""
    from lowbit.compress.finetune import FinetuneConfig, finetune

    config = FinetuneConfig.from_dict(recipe.finetune)
    if calib_data is None and config.data is None:
        calib_data = calibration_data(recipe, tokenizer)
    report = finetune(
        model,
        teacher,
        config=config,
        blocks=calib_data,
        tokenizer=tokenizer,
        state_dir=state_dir,
        progress=progress,
    )
    return report.plan


def calibration_data(recipe: Recipe, tokenizer) -> torch.Tensor:
    """Token blocks [samples, seq_len] from the recipe's calibration source."""
    cal = recipe.calibration
    if tokenizer is None:
        raise CompressError("this recipe needs calibration data: pass a tokenizer or token blocks")
    return calibration_blocks(tokenizer, cal.data, cal.samples, cal.seq_len, seed=cal.seed)
