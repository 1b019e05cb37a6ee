"""The compress pipeline: calibrate -> decompose -> pack, over one model and one recipe.

Every linear layer that the recipe selects becomes a `QLinear` holding W ~ Q + L1 L2 (Q packed low-bit
codes, L1 L2 a high-precision low-rank part, optional SVDQuant smoothing). When the recipe needs
calibration statistics (GPTQ rounding, SVDQuant, Fisher-weighted LQ-LoRA), the model is run block by
block and each block is compressed as soon as its statistics are in; the next block then sees the
compressed block's outputs (GPTQ's sequential protocol).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration import calibrate_sequential, fisher_diagonal
from lowbit.calibration.data import calibration_blocks
from lowbit.compress.checkpoint import save
from lowbit.compress.models import load_model
from lowbit.compress.qlinear import QLinear, set_submodule
from lowbit.compress.recipe import Recipe
from lowbit.lowrank import decompose


class CompressError(ValueError):
    """The model cannot be compressed as asked (no layer selected, non-finite weights, ...)."""


@dataclass
class CompressReport:
    """What a compress run did: per-layer plan, sizes, errors and time."""

    model: str
    recipe: dict
    layers: dict = field(default_factory=dict)
    bits_per_weight: float = 0.0
    quantized_params: int = 0
    seconds: float = 0.0
    out: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


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
    """Decompose one layer's weight W [N, K] into Q + L1 L2 and return the QLinear holding it."""
    cfg = recipe.layer_config(name)
    dec = recipe.decompose
    W = linear.weight.detach().float()
    d = decompose(
        W,
        cfg.spec(),
        dec.rank,
        dec.method,
        H=None if stats is None else stats.hessian_matrix(),
        act_max=None if stats is None else stats.act_max,
        fisher=fisher,
        rounding=cfg.rounding,
        iterations=dec.iterations,
    )
    dtype = linear.weight.dtype
    return QLinear.from_linear(
        linear,
        d.q,
        None if d.l1 is None else d.l1.to(dtype),
        None if d.l2 is None else d.l2.to(dtype),
        None if d.smooth is None else d.smooth.to(dtype),
    )


def quantize_model(
    model: nn.Module, recipe: Recipe, tokenizer=None, *, calib_data=None, progress: bool = True
) -> dict[str, dict]:
    """Replace the selected linears of `model` in place by QLinears; return the per-layer plan.

    calib_data: LongTensor [S, L] of token blocks; when None and the recipe needs calibration,
    blocks are drawn from recipe.calibration.data with `tokenizer`.
    """
    linears = select_linears(model, recipe)
    if not recipe.needs_calibration():
        for name, lin in tqdm(linears.items(), desc="quantize", disable=not progress):
            set_submodule(model, name, compress_layer(name, lin, recipe))
        return {name: model.get_submodule(name).layer_plan() for name in linears}

    cal = recipe.calibration
    if calib_data is None:
        if tokenizer is None:
            raise CompressError("this recipe needs calibration data: pass a tokenizer or token blocks")
        calib_data = calibration_blocks(tokenizer, cal.data, cal.samples, cal.seq_len, seed=cal.seed)
    fisher = {}
    if recipe.decompose.method == "lqlora-fisher":
        fisher = fisher_diagonal(model, calib_data, layers=list(linears), progress=progress)

    def on_block(index: int, block: nn.Module, block_stats: dict) -> None:
        for name, stats in block_stats.items():
            if name in linears:
                q = compress_layer(name, linears[name], recipe, stats, fisher.get(name))
                set_submodule(model, name, q)

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


def compress(
    model_or_id: str | nn.Module,
    recipe: Recipe | None = None,
    out: str | Path | None = None,
    *,
    tokenizer=None,
    calib_data: torch.Tensor | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[nn.Module, CompressReport]:
    """Compress a model (a name, a path or a loaded transformers model) with `recipe`.

    Writes a checkpoint to `out` when given (never a half-written one) and returns the compressed
    model and its report.
    """
    t0 = time.perf_counter()
    recipe = recipe or Recipe()
    name = model_or_id if isinstance(model_or_id, str) else type(model_or_id).__name__
    if out is not None and Path(out).exists() and not overwrite:
        raise FileExistsError(f"output folder {out} exists; pass --overwrite to replace it")
    if isinstance(model_or_id, str):
        model, tokenizer = load_model(model_or_id)
    else:
        model = model_or_id
    model.eval()
    plan = quantize_model(model, recipe, tokenizer, calib_data=calib_data, progress=progress)
    report = CompressReport(model=name, recipe=recipe.to_dict(), layers=plan)
    report.quantized_params = sum(math.prod(e["shape"]) for e in plan.values())
    report.bits_per_weight = plan_bits(model, plan) / report.quantized_params
    if out is not None:
        save(model, out, plan=plan, recipe=recipe.to_dict(), tokenizer=tokenizer, overwrite=overwrite)
        report.out = str(out)
    report.seconds = time.perf_counter() - t0
    return model, report


def plan_bits(model: nn.Module, plan: dict[str, dict]) -> int:
    """Exact storage bits of the quantized layers: codes, scales, zeros, low-rank factors, smoothing."""
    total = 0
    for name in plan:
        m = model.get_submodule(name)
        total += sum(t.numel() * t.element_size() * 8 for n, t in m.state_dict().items() if n != "bias")
    return total
