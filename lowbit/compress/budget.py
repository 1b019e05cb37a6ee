"""Compression to bits-per-weight budgets: calibrate -> error table -> allocate -> quantize (-> finetune)
-> pack, once per budget over one error table.

The stages are resumable: calibration statistics, every layer's row of the error table, and every
compressed layer are saved in a work area (`lowbit.compress.workarea`) as they finish, so a killed job
resumes where it stopped and a new budget reuses the calibration and the error table. With SVDQuant, the
layers that read a norm's output share one smoothing vector per norm, folded into it, as in the uniform
path (`smoothing_stage`). With a `scaling` section, AWQ's scales are searched once on the float model and
folded before the statistics and the error table (`scaling_stage`), so every candidate is measured, and
rounded, on the scaled weights. `allocate.probes` rescales the table by measured probes and
`allocate.penalties` measures a few penalised plans per budget and keeps the best, and `allocate.check`
keeps the best uniform spec when the allocation is worse (`lowbit.compress.probes`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration import CalibrationStats, calibrate, calibrate_sequential
from lowbit.compress.allocate import ErrorTable, candidate_grid, engine_constraints, error_row
from lowbit.compress.awq import activation_scaling, apply_scales
from lowbit.compress.plan import allocated_choice, allocation_method, apply_choice
from lowbit.compress.probes import best_uniform, corrected, loss_with, penalty_search, probe_factors
from lowbit.compress.recipe import Recipe
from lowbit.compress.rotation import rotate_model
from lowbit.compress.smoothing import fold_group, norm_groups
from lowbit.compress.uniform import calibration_data, finetune_stage, select_linears
from lowbit.compress.workarea import WorkArea, job_key
from lowbit.lowrank import METHODS, Stats
from lowbit.lowrank.svdquant import shared_smoothing
from lowbit.nn.atomic import hold_lock
from lowbit.nn.checkpoint import plan_bits, save
from lowbit.nn.manifest import lowbit_version
from lowbit.nn.qlinear import QLinear, set_submodule
from lowbit.nn.smoothing import norm_readers
from lowbit.quantizers import SCALE_DTYPES

logger = logging.getLogger(__name__)


def budget_outs(out: Path, budgets: list[float]) -> list[Path]:
    """One checkpoint folder per budget: `out` itself for one budget, out/bpw-<b> for several."""
    return [out] if len(budgets) == 1 else [out / f"bpw-{b:g}" for b in budgets]


@contextlib.contextmanager
def work_area(model_or_id, recipe: Recipe, out, work_dir, restart: bool, keep_work: bool = True):
    """The job's WorkArea: kept beside `out` for a named model, temporary for an in-memory one.

    keep_work=False removes the job's files once the body has finished without an error (a failed or
    killed job keeps them, so that it resumes), and the work folder itself when nothing else is left in
    it; keeping them lets a later run with another budget reuse the calibration and error table.
    """
    job = {"model": model_or_id if isinstance(model_or_id, str) else None, "lowbit": lowbit_version()}
    job["recipe"] = {**recipe.to_dict(), "allocate": {**recipe.to_dict()["allocate"], "budget": None}}
    if work_dir is None and (out is None or job["model"] is None):
        with tempfile.TemporaryDirectory(prefix="lowbit-work-") as tmp:
            yield WorkArea(tmp, job)
        return
    root = Path(work_dir) if work_dir is not None else Path(out).parent / ".lowbit-work"
    with hold_lock(root / job_key(job)):  # before a restart discards anything: one job per area
        work = WorkArea(root, job, restart=restart)
        yield work
    if not keep_work:
        shutil.rmtree(work.dir)
        with contextlib.suppress(OSError):  # not empty: other jobs' files
            root.rmdir()


@dataclass
class BudgetResult:
    """One budget's outcome: the chosen candidate per layer, the allocation, the checkpoint and the size
    of the work area on disk once this budget was done (`work_bytes`)."""

    budget: float
    plan: dict[str, dict]
    bits_per_weight: float
    error: float
    solver_status: str
    solve_seconds: float
    out: str | None = None
    work_bytes: int = 0
    fallback: str | None = None
    losses: dict | None = None


def readers_of(model: nn.Module) -> dict:
    """`norm_readers` of the model, traced on 16 token ids."""
    n_vocab = model.get_input_embeddings().num_embeddings
    return norm_readers(
        model, (torch.arange(16) % n_vocab)[None].to(model.get_input_embeddings().weight.device)
    )


@torch.no_grad()
def scaling_stage(model, linears, recipe: Recipe, calib_data, work: WorkArea, progress) -> None:
    """AWQ's scales (`lowbit.compress.awq`) searched once per norm group (and per up -> down, v -> o pair)
    on the float model, for quantize's spec, and folded in place; saved, and replayed on a resumed job."""
    if recipe.scaling.method == "none":
        return
    path, readers = work.path("scaling.safetensors"), readers_of(model)
    if path.is_file():
        apply_scales(model, readers, linears, load_file(path))
        return
    with activation_scaling(model, readers, linears, recipe) as stage:
        names = list(linears)
        calibrate_sequential(model, calib_data, layers=names, on_block=stage, keep=False, progress=progress)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.float().contiguous() for k, v in stage.scales.items()}, str(tmp))
    os.replace(tmp, path)


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
        fisher = recipe.allocate.metric == "fisher" or "fisher" in METHODS[allocation_method(recipe)].needs
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
    grid = candidate_grid(
        a.formats, a.bits, a.group_sizes, a.ranks, base=recipe.quantize.spec(), symmetric=a.symmetric
    )
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


def probe_stage(model, linears, table: ErrorTable, recipe: Recipe, calib_data, work: WorkArea) -> ErrorTable:
    """The table rescaled by `allocate.probes` measured probes (`lowbit.compress.probes`), on the first 4
    calibration blocks; the factors are saved."""
    if not recipe.allocate.probes:
        return table
    saved = work.load("probe_factors.safetensors")
    if saved is None:
        k = probe_factors(model, linears, table, calib_data[:4], recipe.allocate.probes)
        saved = {"factors": torch.from_numpy(k)}, {}
        work.save("probe_factors.safetensors", *saved)
    return corrected(table, saved[0]["factors"].numpy())


def allowed_mask(table: ErrorTable, recipe: Recipe) -> tuple[np.ndarray, list[list[int]]]:
    """(allowed bool [M, C], tied groups of rows): the recipe's pins, forbids and minimum bits, among the
    candidates the recipe's target engine serves, each fused group of layers it runs as one matrix."""
    a = recipe.allocate
    forbid = [(f["match"], {k: v for k, v in f.items() if k != "match"}) for f in a.forbid]
    served, tied = engine_constraints(table.names, table.shapes, table.candidates, recipe.target)
    return table.mask(pins=a.pins, forbid=forbid, min_bits=a.min_bits) & served, tied


def allocation_stage(table: ErrorTable, recipe: Recipe, budget: float):
    """The ILP (or greedy) choice of one candidate per layer under `budget` bits per weight, within
    `allowed_mask`, each fused group of layers tied to one candidate."""
    allowed, tied = allowed_mask(table, recipe)
    alloc = table.allocate(budget, allowed=allowed, solver=recipe.allocate.solver, tied=tied)
    return table.plan(alloc), alloc


def check_stage(model, linears, table, recipe, stats, work, budget, plan, qlinears, calib_data, progress):
    """(plan, QLinears, fallback spec or None, losses): the allocated layers, or those of the best uniform
    spec at no more bits when its calibration loss is lower (`lowbit.compress.probes`)."""
    c = best_uniform(table, budget, allowed_mask(table, recipe)[0])
    if c is None:
        return plan, qlinears, None, None
    spec = table.candidates[c].spec.short()
    uniform = {name: table.candidates[c] for name in linears}
    tag = f"uniform-{spec}"
    q_uniform = quantize_stage(linears, uniform, recipe, stats, work, tag, progress)
    losses = {
        "allocated": loss_with(model, qlinears, calib_data),
        tag: loss_with(model, q_uniform, calib_data),
    }
    logger.info("budget %.3f: calibration loss %s", budget, losses)
    if losses[tag] < losses["allocated"]:
        return uniform, q_uniform, spec, losses
    return plan, qlinears, None, losses


@torch.no_grad()
def smoothing_stage(
    model: nn.Module, linears, plan, stats: dict[str, Stats], work: WorkArea, tag: str, teacher
) -> tuple[dict[str, tuple[torch.Tensor, bool]], list]:
    """SVDQuant's shared smoothing for the allocated layers that read a norm's output.

    One lambda per norm, searched over its readers with each reader's allocated spec and rank
    (`shared_smoothing`), saved under `tag`, and folded into the norm (and the teacher's) as the uniform
    path does (`lowbit.compress.smoothing`). The error table measured every candidate with its own
    lambda. Returns ({layer: (lambda, folded)}, [(module, its state before the fold)]) so that the
    caller can undo the folds before the next budget.
    """
    readers = readers_of(model)
    smooth, before = {}, []
    for norm, members in norm_groups(model, readers, linears).items():
        saved = work.load(f"{tag}/smoothing/{norm}.safetensors")
        if saved is None:
            st = stats.get(members[0], Stats())
            Ws = [linears[n].weight.detach().float() for n in members]
            specs, ranks = [plan[n].spec for n in members], [plan[n].rank for n in members]
            lam, _ = shared_smoothing(Ws, specs, ranks, Stats(H=st.H, act_max=st.act_max))
            saved = ({} if lam is None else {"lambda": lam}), {}
            work.save(f"{tag}/smoothing/{norm}.safetensors", *saved)
        lam = saved[0].get("lambda")
        if lam is None:
            continue
        touched = [norm, *(n for n in readers[norm][0] if n not in members)]
        nets = [(model, touched)] + ([(teacher, [norm, *readers[norm][0]])] if teacher is not None else [])
        mods = [net.get_submodule(n) for net, names in nets for n in names]
        before += [(m, {k: v.clone() for k, v in m.state_dict().items()}) for m in mods]
        folded = fold_group(model, norm, readers, members, lam, teacher)
        smooth.update({n: (lam, folded) for n in members})
    return smooth, before


def quantize_stage(
    linears, plan, recipe: Recipe, stats, work: WorkArea, tag: str, progress, smooth=None
) -> dict:
    """{name: QLinear} for the allocated candidates; each finished layer saved under `tag`.

    smooth: {layer: (lambda, folded)} from `smoothing_stage`; those layers are SVDQuant with that lambda.
    """
    smooth = smooth or {}
    out = {}
    for name, lin in tqdm(linears.items(), desc=f"quantize {tag}", disable=not progress):
        saved = work.load(f"{tag}/{name}.safetensors")
        if saved is None:
            choice = allocated_choice(plan[name], recipe)
            q = apply_choice(lin, choice, recipe, stats.get(name, Stats()), smooth.get(name))
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
    rotate_model(model, recipe.rotate, list(linears))  # QuaRot's rotations, before any statistics
    recipe = with_budget(recipe, budgets[0])  # so that needs_calibration() sees the allocation
    a = recipe.allocate
    # probes and the check read the token blocks themselves; the statistics only when not yet saved
    saved = work.path("calibration.safetensors").is_file()
    reads = a.probes or a.penalties or a.check
    if calib_data is None and (reads or (recipe.needs_calibration() and not saved)):
        calib_data = calibration_data(recipe, tokenizer)
    scaling_stage(model, linears, recipe, calib_data, work, progress)
    stats = calibration_stage(model, linears, recipe, calib_data, work, progress)
    table = table_stage(linears, recipe, stats, work, progress)
    table = probe_stage(model, linears, table, recipe, calib_data, work)
    teacher = copy.deepcopy(model) if recipe.finetune else None  # the original, before any swap
    results = []
    for i, (budget, out) in enumerate(zip(budgets, outs, strict=True)):
        solve = functools.partial(allocation_stage, recipe=recipe, budget=budget)
        if a.penalties:
            args = (a.penalties, recipe.quantize.spec().bits, calib_data[:4], stats)
            plan, alloc, searched = penalty_search(model, linears, table, solve, *args)
        else:
            (plan, alloc), searched = solve(table), {}
        logger.info("budget %.3f: %s in %.2f s", budget, alloc.status, alloc.seconds)
        tag, smooth, before = f"bpw-{budget:g}", {}, []
        if METHODS[allocation_method(recipe)].shares_smoothing:
            smooth, before = smoothing_stage(model, linears, plan, stats, work, tag, teacher)
        qlinears = quantize_stage(linears, plan, recipe, stats, work, tag, progress, smooth)
        fallback = losses = None
        if a.check:
            args = (budget, plan, qlinears, calib_data, progress)
            plan, qlinears, fallback, losses = check_stage(model, linears, table, recipe, stats, work, *args)
        losses = {**searched, **(losses or {})} or None
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
            fallback=fallback,
            losses=losses,
        )
        if out is not None:
            used = with_budget(recipe, budget).to_dict()
            save(model, out, plan=entries, recipe=used, tokenizer=tokenizer, overwrite=overwrite)
            r.out = str(out)
        r.work_bytes = work.size()
        if i < len(budgets) - 1:
            for name, lin in linears.items():
                set_submodule(model, name, lin)
            for m, state in before:  # undo the folds of shared smoothing
                m.load_state_dict(state)
        results.append(r)
    return results


def with_budget(recipe: Recipe, budget: float) -> Recipe:
    return replace(recipe, allocate=replace(recipe.allocate, budget=budget))
