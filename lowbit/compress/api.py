"""The compress pipeline: calibrate -> decompose -> allocate -> finetune -> pack.

`compress` is the entry point. Without a budget every layer takes the recipe's one setting
(`lowbit.compress.uniform`); with a budget (`allocate.budget`, or several budgets at once) an ILP picks a
format, group size and rank per layer and the stages are resumable (`lowbit.compress.budget`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.compress.budget import budget_outs, compress_to_budgets, work_area
from lowbit.compress.recipe import Recipe, resolve_recipe
from lowbit.compress.uniform import finetune_stage, quantize_model
from lowbit.models import load_model
from lowbit.nn.atomic import check_output
from lowbit.nn.checkpoint import plan_bits, save


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
    budgets: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def compress(
    model_or_id: str | nn.Module,
    recipe: Recipe | str | None = None,
    out: str | Path | None = None,
    *,
    budget: float | None = None,
    budgets: list[float] | None = None,
    tokenizer=None,
    calib_data: torch.Tensor | None = None,
    overwrite: bool = False,
    restart: bool = False,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[nn.Module, CompressReport]:
    """Compress a model (a name, a path or a loaded transformers model) with `recipe`: a Recipe, a
    preset name (`lowbit.compress.recipe.PRESETS`) or a recipe file (.yaml / .json); default int4-g128.

    budget / budgets (average bits per weight; default the recipe's allocate.budget): allocate a
    format, group size and rank per layer by ILP. With several budgets, `out` becomes a folder holding
    one checkpoint per budget (`bpw-<budget>`). The work area (`work_dir`, default `.lowbit-work`
    beside `out`) keeps finished stages so that the same command resumes and a new budget reuses the
    calibration and error table; `restart` discards it. Checkpoints are never half-written. Returns
    the compressed model (the last budget's) and the report.
    """
    t0 = time.perf_counter()
    recipe = resolve_recipe(recipe)
    name = model_or_id if isinstance(model_or_id, str) else type(model_or_id).__name__
    if out is not None:
        check_output(out, overwrite)
    budgets = list(budgets or ([budget] if budget is not None else []))
    if not budgets and recipe.allocate.budget is not None:
        budgets = [recipe.allocate.budget]
    if isinstance(model_or_id, str):
        model, tokenizer = load_model(model_or_id)
    else:
        model = model_or_id
    model.eval()
    report = CompressReport(model=name, recipe=recipe.to_dict())
    if budgets:
        outs = [None] * len(budgets) if out is None else budget_outs(Path(out), budgets)
        with work_area(model_or_id, recipe, out, work_dir, restart) as work:
            results = compress_to_budgets(
                model,
                recipe,
                budgets,
                work,
                tokenizer=tokenizer,
                calib_data=calib_data,
                outs=outs,
                overwrite=overwrite,
                progress=progress,
            )
        report.budgets = [r.__dict__ for r in results]
        plan = results[-1].plan
    else:
        teacher = copy.deepcopy(model) if recipe.finetune else None
        plan = quantize_model(
            model, recipe, tokenizer, calib_data=calib_data, progress=progress, teacher=teacher
        )
        if teacher is not None:
            plan = finetune_stage(model, teacher, recipe, tokenizer, calib_data, progress)
        if out is not None:
            save(model, out, plan=plan, recipe=recipe.to_dict(), tokenizer=tokenizer, overwrite=overwrite)
    report.layers = plan
    report.quantized_params = sum(math.prod(e["shape"]) for e in plan.values())
    report.bits_per_weight = plan_bits(model, plan) / report.quantized_params
    report.out = None if out is None else str(out)
    report.seconds = time.perf_counter() - t0
    return model, report
