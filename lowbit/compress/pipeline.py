"""The compress pipeline: calibrate -> decompose -> allocate -> finetune -> pack.

Every linear layer that the recipe selects becomes a `QLinear` holding W ~ Q + L1 L2 (Q packed low-bit
codes, L1 L2 a high-precision low-rank part, optional SVDQuant smoothing). Without a budget, SVDQuant's
smoothing of the layers that read a norm's output is shared per norm and folded into the norm's weight
(`lowbit.compress.smoothing`); other layers keep their own in their QLinear.

Without a budget every layer takes the recipe's one setting. When that needs calibration statistics
(GPTQ rounding, SVDQuant, Fisher-weighted LQ-LoRA), the model is run block by block and each block is
compressed as soon as its statistics are in; the next block then sees the compressed block's outputs
(GPTQ's sequential protocol).

With a budget (`allocate.budget`, or several budgets at once), the stages are resumable: calibration
statistics, every layer's row of the error table, and every compressed layer are saved in a work area
(`lowbit.compress.workarea`) as they finish, so a killed job resumes where it stopped and a new budget
reuses the calibration and the error table. See `compress_to_budgets`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration import CalibrationStats, calibrate, calibrate_sequential, fisher_diagonal
from lowbit.calibration.data import calibration_blocks
from lowbit.compress.allocate import ErrorTable, candidate_grid, error_row
from lowbit.compress.checkpoint import lowbit_version, save
from lowbit.compress.models import load_model
from lowbit.compress.qlinear import QLinear, set_submodule
from lowbit.compress.recipe import Recipe
from lowbit.compress.smoothing import compress_norm_groups, norm_readers, qlinear_of
from lowbit.compress.workarea import WorkArea
from lowbit.lowrank import Stats, decompose
from lowbit.quantizers import SCALE_DTYPES

logger = logging.getLogger(__name__)


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
    budgets: list[dict] = field(default_factory=list)

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
        method if rank or method == "svdquant" else "none",
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
        calib_data = _calibration_data(recipe, tokenizer)
    fisher, readers = {}, {}
    if recipe.decompose.method == "lqlora-fisher":
        fisher = fisher_diagonal(model, calib_data, layers=list(linears), progress=progress)
    if recipe.decompose.method == "svdquant":
        readers = norm_readers(model, calib_data[:1, :16].to(model.get_input_embeddings().weight.device))

    def on_block(index: int, block: nn.Module, block_stats: dict) -> None:
        done = compress_norm_groups(model, readers, linears, block_stats, recipe, teacher)
        for name, stats in block_stats.items():
            if name in linears and name not in done:
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
    budget: float | None = None,
    budgets: list[float] | None = None,
    tokenizer=None,
    calib_data: torch.Tensor | None = None,
    overwrite: bool = False,
    restart: bool = False,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[nn.Module, CompressReport]:
    """Compress a model (a name, a path or a loaded transformers model) with `recipe`.

    budget / budgets (average bits per weight; default the recipe's allocate.budget): allocate a
    format, group size and rank per layer by ILP. With several budgets, `out` becomes a folder holding
    one checkpoint per budget (`bpw-<budget>`). The work area (`work_dir`, default `.lowbit-work`
    beside `out`) keeps finished stages so that the same command resumes and a new budget reuses the
    calibration and error table; `restart` discards it. Checkpoints are never half-written. Returns
    the compressed model (the last budget's) and the report.
    """
    t0 = time.perf_counter()
    recipe = recipe or Recipe()
    name = model_or_id if isinstance(model_or_id, str) else type(model_or_id).__name__
    if out is not None and Path(out).exists() and not overwrite:
        raise FileExistsError(f"output folder {out} exists; pass --overwrite to replace it")
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
        with _work_area(model_or_id, recipe, out, work_dir, restart) as work:
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


def finetune_stage(
    model, teacher, recipe: Recipe, tokenizer, calib_data, progress: bool, state_dir: Path | None = None
) -> dict:
    """Quantization-aware fine-tuning of the compressed model against the original (the teacher);
    returns the new per-layer plan (L4Q merges its low-rank factors). With `state_dir` the run saves
    its state there and a repeated call resumes from it."""
    from lowbit.compress.finetune import FinetuneConfig, finetune

    config = FinetuneConfig.from_dict(recipe.finetune)
    if calib_data is None and config.data is None:
        calib_data = _calibration_data(recipe, tokenizer)
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


def budget_outs(out: Path, budgets: list[float]) -> list[Path]:
    """One checkpoint folder per budget: `out` itself for one budget, out/bpw-<b> for several."""
    return [out] if len(budgets) == 1 else [out / f"bpw-{b:g}" for b in budgets]


@contextlib.contextmanager
def _work_area(model_or_id, recipe: Recipe, out, work_dir, restart: bool):
    """The job's WorkArea: kept beside `out` for a named model, temporary for an in-memory one."""
    job = {"model": model_or_id if isinstance(model_or_id, str) else None, "lowbit": lowbit_version()}
    job["recipe"] = {**recipe.to_dict(), "allocate": {**recipe.to_dict()["allocate"], "budget": None}}
    if work_dir is None and (out is None or job["model"] is None):
        with tempfile.TemporaryDirectory(prefix="lowbit-work-") as tmp:
            yield WorkArea(tmp, job)
        return
    root = Path(work_dir) if work_dir is not None else Path(out).parent / ".lowbit-work"
    yield WorkArea(root, job, restart=restart)


def plan_bits(model: nn.Module, plan: dict[str, dict]) -> int:
    """Exact storage bits of the quantized layers: codes, scales, zeros, low-rank factors, smoothing."""
    total = 0
    for name in plan:
        m = model.get_submodule(name)
        total += sum(t.numel() * t.element_size() * 8 for n, t in m.state_dict().items() if n != "bias")
    return total


@dataclass
class BudgetResult:
    """One budget's outcome: the chosen candidate per layer, the allocation and the checkpoint."""

    budget: float
    plan: dict[str, dict]
    bits_per_weight: float
    error: float
    solver_status: str
    solve_seconds: float
    out: str | None = None


def allocation_method(recipe: Recipe) -> str:
    """The decomposition behind the error table: the recipe's, or LoRC when ranks compete without one."""
    method = recipe.decompose.method
    return "lorc" if method == "none" and any(recipe.allocate.ranks) else method


def calibration_stage(
    model, linears, recipe: Recipe, calib_data, work: WorkArea, progress
) -> dict[str, Stats]:
    """Per-layer statistics from the original model (every candidate is measured against the same inputs)."""
    if not recipe.needs_calibration():
        return {}
    path = work.path("calibration.safetensors")
    if path.is_file():
        cal = CalibrationStats.load(path)
    else:
        fisher = recipe.allocate.metric == "fisher" or allocation_method(recipe) == "lqlora-fisher"
        kinds = ("act", "hessian", "fisher") if fisher else ("act", "hessian")
        cal = calibrate(model, calib_data, stats=kinds, layers=list(linears), progress=progress)
        tmp = path.with_name(path.name + ".tmp")
        cal.save(tmp)
        os.replace(tmp, path)
    return {
        name: Stats(
            H=None if st.hessian is None else st.hessian_matrix(), act_max=st.act_max, fisher=st.fisher
        )
        for name, st in cal.layers.items()
    }


def table_stage(linears, recipe: Recipe, stats: dict[str, Stats], work: WorkArea, progress) -> ErrorTable:
    """Every layer's error and exact size under every candidate; one saved row per finished layer."""
    path = work.path("error_table.safetensors")
    if path.is_file():
        return ErrorTable.load(path)
    a = recipe.allocate
    grid = candidate_grid(a.formats, a.bits, a.group_sizes, a.ranks, base=recipe.quantize.spec())
    info = dict(
        method=allocation_method(recipe),
        metric=a.metric,
        rounding=a.rounding or recipe.quantize.rounding,
        iterations=recipe.decompose.iterations,
    )
    lowrank_bits = 8 * SCALE_DTYPES[recipe.decompose.lowrank_dtype].itemsize
    errs, sizes = [], []
    for name, lin in tqdm(linears.items(), desc="error table", disable=not progress):
        row = work.load(f"table/{name}.safetensors")
        if row is None:
            e, z = error_row(
                lin.weight.detach().float(),
                grid,
                stats=stats.get(name),
                lowrank_dtype_bits=lowrank_bits,
                **info,
            )
            row = {"errors": torch.from_numpy(e), "sizes": torch.from_numpy(z)}, {}
            work.save(f"table/{name}.safetensors", *row)
        errs.append(row[0]["errors"].numpy())
        sizes.append(row[0]["sizes"].numpy())
    shapes = [tuple(lin.weight.shape) for lin in linears.values()]
    table = ErrorTable(list(linears), shapes, grid, np.stack(errs), np.stack(sizes), info)
    table.save(path)
    return table


def allocation_stage(table: ErrorTable, recipe: Recipe, budget: float):
    """The ILP (or greedy) choice of one candidate per layer under `budget` bits per weight."""
    a = recipe.allocate
    forbid = [(f["match"], {k: v for k, v in f.items() if k != "match"}) for f in a.forbid]
    allowed = table.mask(pins=a.pins, forbid=forbid, min_bits=a.min_bits)
    alloc = table.allocate(budget, allowed=allowed, solver=a.solver)
    return table.plan(alloc), alloc


def quantize_stage(linears, plan, recipe: Recipe, stats, work: WorkArea, tag: str, progress) -> dict:
    """{name: QLinear} for the allocated candidates; each finished layer saved under `tag`."""
    method = allocation_method(recipe)
    out = {}
    for name, lin in tqdm(linears.items(), desc=f"quantize {tag}", disable=not progress):
        saved = work.load(f"{tag}/{name}.safetensors")
        if saved is None:
            c = plan[name]
            q = decompose_layer(
                lin, c.spec, c.rank, method, recipe.quantize.rounding, recipe, stats.get(name, Stats())
            )
            work.save(f"{tag}/{name}.safetensors", q.state_dict(), q.layer_plan())
        else:
            tensors, entry = saved
            q = QLinear.from_plan(entry, lin.weight.dtype, device=lin.weight.device)
            q.load_state_dict(tensors, assign=True)
        out[name] = q
    return out


def compress_to_budgets(
    model: nn.Module,
    recipe: Recipe,
    budgets: list[float],
    work: WorkArea,
    *,
    tokenizer=None,
    calib_data=None,
    outs: list[Path | None],
    overwrite: bool = False,
    progress: bool = True,
) -> list[BudgetResult]:
    """calibrate -> error table -> allocate -> quantize -> pack, once per budget over one table.

    The model is left with the last budget's QLinears in place; earlier budgets' checkpoints are
    written to their `outs` (when given) and their layers swapped back out.
    """
    linears = select_linears(model, recipe)
    recipe = with_budget(recipe, budgets[0])  # so that needs_calibration() sees the allocation
    if (
        recipe.needs_calibration()
        and calib_data is None
        and not work.path("calibration.safetensors").is_file()
    ):
        calib_data = _calibration_data(recipe, tokenizer)
    stats = calibration_stage(model, linears, recipe, calib_data, work, progress)
    table = table_stage(linears, recipe, stats, work, progress)
    teacher = copy.deepcopy(model) if recipe.finetune else None  # the original, before any swap
    results = []
    for i, (budget, out) in enumerate(zip(budgets, outs, strict=True)):
        plan, alloc = allocation_stage(table, recipe, budget)
        logger.info("budget %.3f: %s in %.2f s", budget, alloc.status, alloc.seconds)
        qlinears = quantize_stage(linears, plan, recipe, stats, work, f"bpw-{budget:g}", progress)
        for name, q in qlinears.items():
            set_submodule(model, name, q)
        entries = {name: q.layer_plan() for name, q in qlinears.items()}
        if teacher is not None:
            state = work.path(f"bpw-{budget:g}-finetune")
            entries = finetune_stage(model, teacher, recipe, tokenizer, calib_data, progress, state)
        params = sum(math.prod(e["shape"]) for e in entries.values())
        r = BudgetResult(
            budget,
            entries,
            plan_bits(model, entries) / params,
            float(alloc.error),
            alloc.status,
            float(alloc.seconds),
        )
        if out is not None:
            used = with_budget(recipe, budget).to_dict()
            save(model, out, plan=entries, recipe=used, tokenizer=tokenizer, overwrite=overwrite)
            r.out = str(out)
        if i < len(budgets) - 1:
            for name, lin in linears.items():
                set_submodule(model, name, lin)
        results.append(r)
    return results


def with_budget(recipe: Recipe, budget: float) -> Recipe:
    return replace(recipe, allocate=replace(recipe.allocate, budget=budget))


def _calibration_data(recipe: Recipe, tokenizer) -> torch.Tensor:
    cal = recipe.calibration
    if tokenizer is None:
        raise CompressError("this recipe needs calibration data: pass a tokenizer or token blocks")
    return calibration_blocks(tokenizer, cal.data, cal.samples, cal.seq_len, seed=cal.seed)
