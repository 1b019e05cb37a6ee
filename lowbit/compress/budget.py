"""Compression to bits-per-weight budgets: calibrate -> error table -> allocate -> quantize (-> finetune)
-> pack, once per budget over one error table.

The statistics and the error table come from one pass over the decoder blocks, the allocated layers
from a second (`lowbit.compress.budget_passes`): one block's statistics are in memory at a time. The
stages are resumable: every layer's row of the error table, each block's AWQ scales and every compressed
layer are saved in a work area (`lowbit.compress.workarea`) as they finish, so a killed job resumes where
it stopped and a new budget reuses the error table without calibrating again. With SVDQuant, the layers
that read a norm's output share one smoothing vector per norm, folded into it, as in the uniform path.
With a `scaling` section, AWQ's scales are searched on each block of the float model and folded before
its statistics and rows, so every candidate is measured, and rounded, on the scaled weights.
`allocate.probes` rescales the table by measured probes, `allocate.penalties` measures a few penalised
plans per budget and keeps the best, and `allocate.check` keeps the best uniform spec when the
allocation is worse (`lowbit.compress.probes`). `rotate` folds QuaRot's rotations into the float model
before anything is measured (`lowbit.compress.rotation`). A safetensors folder is compressed block by
block from disk (`lowbit.compress.budget_stream`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.calibration.stats import find_blocks
from lowbit.compress.allocate import ErrorTable, engine_constraints, merge_groups, type_groups
from lowbit.compress.blocks import InMemory
from lowbit.compress.budget_passes import ScaledBlocks, apply_pass, table_pass
from lowbit.compress.losses import Runner, Variant, block_layers, cached, in_memory_losses, replaced_modules
from lowbit.compress.plan import allocation_method
from lowbit.compress.probes import best_uniform, corrected, penalty_search, probe_factors
from lowbit.compress.recipe import Recipe
from lowbit.compress.rotation import rotate_model
from lowbit.compress.smoothing import fold_group, norm_groups
from lowbit.compress.uniform import calibration_data, finetune_stage, select_linears
from lowbit.compress.workarea import WorkArea, job_key
from lowbit.lowrank import METHODS
from lowbit.nn.atomic import hold_lock
from lowbit.nn.checkpoint import plan_bits, save
from lowbit.nn.manifest import lowbit_version
from lowbit.nn.qlinear import QLinear, set_submodule
from lowbit.nn.smoothing import norm_readers
from lowbit.parallel import barrier, broadcast_bytes, world

logger = logging.getLogger(__name__)


def budget_outs(out: Path, budgets: list[float]) -> list[Path]:
    """One checkpoint folder per budget: `out` itself for one budget, out/bpw-<b> for several."""
    return [out] if len(budgets) == 1 else [out / f"bpw-{b:g}" for b in budgets]


@contextlib.contextmanager
def work_area(
    model_or_id,
    recipe: Recipe,
    out,
    work_dir,
    restart: bool,
    keep_work: bool = True,
    settings=None,
    max_work_bytes: int | None = None,
):
    """The job's WorkArea: kept beside `out` for a named model, temporary for an in-memory one.

    keep_work=False removes the job's files once the body has finished without an error (a failed or
    killed job keeps them, so that it resumes), and the work folder itself when nothing else is left in
    it; keeping them lets a later run with another budget reuse the error table. settings: those of a
    streamed source (dtype, device, shard size), part of the job's key. max_work_bytes: the work area's
    size limit (`WorkArea.max_bytes`). Under several processes rank 0 creates (and locks) it and the
    others open the same folder.
    """
    job = {"model": model_or_id if isinstance(model_or_id, str) else None, "lowbit": lowbit_version()}
    job["recipe"] = {**recipe.to_dict(), "allocate": {**recipe.to_dict()["allocate"], "budget": None}}
    if settings is not None:  # a streamed source: its dtype, device and shard size
        job["stream"] = settings
    ranks = world()
    if work_dir is None and (out is None or job["model"] is None):
        with tempfile.TemporaryDirectory(prefix="lowbit-work-") if ranks.main else _none() as tmp:
            tmp = broadcast_bytes(tmp.encode() if ranks.main else None, 0, ranks).decode()
            yield WorkArea(tmp, job, max_bytes=max_work_bytes)
            barrier(ranks)  # every process is done with it before rank 0 removes it
        return
    root = Path(work_dir) if work_dir is not None else Path(out).parent / ".lowbit-work"
    with hold_lock(root / job_key(job)) if ranks.main else _none():  # one job per area
        if ranks.main:
            work = WorkArea(root, job, restart=restart, max_bytes=max_work_bytes)
        barrier(ranks)
        if not ranks.main:
            work = WorkArea(root, job, max_bytes=max_work_bytes)
        yield work
        barrier(ranks)
    if not keep_work and ranks.main:
        shutil.rmtree(work.dir)
        with contextlib.suppress(OSError):  # not empty: other jobs' files
            root.rmdir()


@contextlib.contextmanager
def _none():
    yield None


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


def table_stage(model, provider, linears, recipe: Recipe, calib_data, work: WorkArea, progress, readers):
    """The error table (`lowbit.compress.budget_passes.table_pass`), saved once whole; every block of a
    model in memory then holds its AWQ scales (replayed from the work area on a resumed job)."""
    path = work.path("error_table.safetensors")
    if path.is_file():
        table = ErrorTable.load(path)
    else:
        table = table_pass(model, provider, linears, recipe, calib_data, work, progress, readers)
        if world().main:
            table.save(path)
    if isinstance(provider.provider, InMemory):
        for i in range(len(provider.blocks)):
            provider.materialise(i)
    return table


def probe_stage(model, linears, table: ErrorTable, recipe: Recipe, calib_data, work: WorkArea, run: Runner):
    """The table rescaled by `allocate.probes` measured probes (`lowbit.compress.probes`), on the first 4
    calibration blocks, measured by `run`; the factors are saved."""
    if not recipe.allocate.probes:
        return table
    saved = work.load("probe_factors.safetensors")
    if saved is None:
        k = probe_factors(model, linears, table, calib_data[:4], recipe.allocate.probes, run)
        saved = {"factors": torch.from_numpy(k)}, {}
        if world().main:
            work.save("probe_factors.safetensors", *saved)
    return corrected(table, saved[0]["factors"].numpy())


def search_stage(model, linears, recipe: Recipe, calib_data, run: Runner):
    """`allocate.penalties`' search for `plans_for` (`lowbit.compress.probes.penalty_search`), each plan
    rounded to nearest and measured by `run` on the first 4 calibration blocks; None without penalties."""
    a = recipe.allocate
    if not a.penalties:
        return None
    args = (a.penalties, recipe.quantize.spec().bits, calib_data[:4])
    return lambda table, solve: penalty_search(model, linears, table, solve, *args, run=run)


def allowed_mask(table: ErrorTable, recipe: Recipe) -> tuple[np.ndarray, list[list[int]]]:
    """(allowed bool [M, C], tied groups of rows): the recipe's pins, forbids and minimum bits, among the
    candidates the recipe's target engine serves; tied: each fused group of layers the engine runs as one
    matrix, and with `allocate.tie: type` the layers of each type (joined where the two overlap)."""
    a = recipe.allocate
    forbid = [(f["match"], {k: v for k, v in f.items() if k != "match"}) for f in a.forbid]
    served, tied = engine_constraints(table.names, table.shapes, table.candidates, recipe.target)
    if a.tie == "type":
        tied = merge_groups([*tied, *type_groups(table.names)])
    return table.mask(pins=a.pins, forbid=forbid, min_bits=a.min_bits) & served, tied


def allocation_stage(table: ErrorTable, recipe: Recipe, budget: float):
    """The ILP (or greedy) choice of one candidate per layer under `budget` bits per weight, within
    `allowed_mask`, each fused group of layers tied to one candidate; under several processes every
    rank solves (so that all raise alike) and takes rank 0's solution."""
    allowed, tied = allowed_mask(table, recipe)
    alloc = table.allocate(budget, allowed=allowed, solver=recipe.allocate.solver, tied=tied)
    ranks = world()
    if ranks.size > 1:
        mine = {"choice": [int(c) for c in alloc.choice], "seconds": alloc.seconds, "status": alloc.status}
        sent = broadcast_bytes(json.dumps(mine).encode() if ranks.main else None, 0, ranks)
        got = json.loads(sent)
        choice = np.asarray(got["choice"], dtype=np.int64)
        error = float(table.errors[torch.arange(len(choice)), torch.from_numpy(choice)].sum())
        bits = int(table.sizes[torch.arange(len(choice)), torch.from_numpy(choice)].sum())
        alloc = replace(
            alloc, choice=choice, error=error, bits=bits, seconds=got["seconds"], status=got["status"]
        )
    return table.plan(alloc), alloc


def uniform_plan(table: ErrorTable, recipe: Recipe, budget: float) -> tuple[str, dict] | None:
    """(tag, plan) of `allocate.check`'s best uniform spec at no more bits than `budget`, or None."""
    c = best_uniform(table, budget, allowed_mask(table, recipe)[0])
    if c is None:
        return None
    return f"uniform-{table.candidates[c].spec.short()}", {name: table.candidates[c] for name in table.names}


def saved_variant(model, linears, work: WorkArea, tag: str) -> Variant:
    """The float model with the layers the second pass saved under `tag`, read block by block."""
    prefix = find_blocks(model)[0]

    def swap(index: int | None):
        chosen = {n: linears[n] for n in block_layers(linears, prefix, index)}
        return replaced_modules(model, saved_layers(chosen, work, tag))

    return Variant(0, swap)


def check_stage(model, linears, work, allocs: dict, uniforms: dict, calib_data, run: Runner) -> dict:
    """{budget: (plan, tag of its saved layers, fallback spec or None, losses or None)}: each budget's
    allocated layers, or those of the best uniform spec at no more bits (`uniforms`: {budget: (tag, plan)
    or None}) when their calibration loss (`run`, every tag measured in one go) is lower."""
    tags = {u[0] for u in uniforms.values() if u is not None}
    tags |= {f"bpw-{b:g}" for b, u in uniforms.items() if u is not None}
    variants = {f"layers-{t}": saved_variant(model, linears, work, t) for t in sorted(tags)}
    measured = run(calib_data, variants) if variants else {}
    out = {}
    for budget, (plan, _, _) in allocs.items():
        tag = f"bpw-{budget:g}"
        if uniforms.get(budget) is None:
            out[budget] = (plan, tag, None, None)
            continue
        utag, uplan = uniforms[budget]
        losses = {"allocated": measured[f"layers-{tag}"], utag: measured[f"layers-{utag}"]}
        logger.info("budget %.3f: calibration loss %s", budget, losses)
        if losses[utag] < losses["allocated"]:
            out[budget] = (uplan, utag, utag.removeprefix("uniform-"), losses)
        else:
            out[budget] = (plan, tag, None, losses)
    return out


@torch.no_grad()
def fold_smoothing(model: nn.Module, readers, linears, work: WorkArea, tag: str, teacher) -> list:
    """Fold each norm's saved SVDQuant lambda (`<tag>/smoothing/<norm>`, from the second pass) into the
    norm (and the teacher's), as the uniform path does (`lowbit.compress.smoothing`). Returns
    [(module, its state before the fold)], so that the caller can undo the folds before the next budget."""
    before = []
    for norm, members in norm_groups(model, readers, linears).items():
        saved = work.load(f"{tag}/smoothing/{norm}.safetensors")
        lam = None if saved is None else saved[0].get("lambda")
        if lam is None:
            continue
        touched = [norm, *(n for n in readers[norm][0] if n not in members)]
        nets = [(model, touched)] + ([(teacher, [norm, *readers[norm][0]])] if teacher is not None else [])
        mods = [net.get_submodule(n) for net, names in nets for n in names]
        before += [(m, {k: v.clone() for k, v in m.state_dict().items()}) for m in mods]
        fold_group(model, norm, readers, members, lam, teacher)
    return before


def saved_layers(linears, work: WorkArea, tag: str) -> dict[str, QLinear]:
    """{name: QLinear} of the layers the second pass saved under `tag`."""
    out = {}
    for name, lin in linears.items():
        tensors, entry = work.load(f"{tag}/{name}.safetensors")
        q = QLinear.from_plan(entry, lin.weight.dtype, device=lin.weight.device)
        q.load_state_dict(tensors, assign=True)
        out[name] = q
    return out


def plans_for(table: ErrorTable, recipe: Recipe, budgets: list[float], search=None) -> tuple[dict, ...]:
    """({budget: (plan, allocation, {penalty: measured loss})}, {tag: plan} of every layer set the second
    pass builds (one per budget, plus each budget's uniform spec under `allocate.check`), {budget: uniform
    (tag, plan)}). search: (table, solve) -> (plan, allocation, losses), `allocate.penalties`' search
    (`lowbit.compress.probes.penalty_search`), or None for the plain allocation."""
    allocs, plans, uniforms = {}, {}, {}
    for budget in budgets:
        solve = functools.partial(allocation_stage, recipe=recipe, budget=budget)
        allocs[budget] = (*solve(table), {}) if search is None else search(table, solve)
        logger.info("budget %.3f: %s in %.2f s", budget, allocs[budget][1].status, allocs[budget][1].seconds)
        plans[f"bpw-{budget:g}"] = allocs[budget][0]
        uniforms[budget] = uniform_plan(table, recipe, budget) if recipe.allocate.check else None
        if uniforms[budget] is not None:
            plans[uniforms[budget][0]] = uniforms[budget][1]
    return allocs, plans, uniforms


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
    """calibrate -> error table -> allocate -> quantize -> pack, once per budget over one table, for a
    model in memory.

    The model is left with the last budget's QLinears in place; earlier budgets' checkpoints are
    written to their `outs` (when given) and their layers swapped back out.
    """
    linears = select_linears(model, recipe)
    rotate_model(model, recipe.rotate, list(linears))  # QuaRot's rotations, before any statistics
    recipe = with_budget(recipe, budgets[0])  # so that needs_calibration() sees the allocation
    a = recipe.allocate
    if calib_data is None and (a.probes or a.penalties or a.check or recipe.needs_calibration()):
        calib_data = calibration_data(recipe, tokenizer)
    shared = METHODS[allocation_method(recipe)].shares_smoothing
    readers = readers_of(model) if shared or recipe.scaling.method != "none" else {}
    provider = ScaledBlocks(InMemory(model), readers, linears, work)
    table = table_stage(model, provider, linears, recipe, calib_data, work, progress, readers)
    run = cached(functools.partial(in_memory_losses, model), work)
    table = probe_stage(model, linears, table, recipe, calib_data, work, run)
    teacher = copy.deepcopy(model) if recipe.finetune else None  # the original, before any swap
    allocs, plans, uniforms = plans_for(
        table, recipe, budgets, search_stage(model, linears, recipe, calib_data, run)
    )
    apply_pass(model, provider, linears, recipe, plans, calib_data, work, progress, readers)
    barrier(world())  # the layers rank 0 saved are there for every process
    checked = check_stage(model, linears, work, allocs, uniforms, calib_data, run)
    results = []
    for i, (budget, out) in enumerate(zip(budgets, outs, strict=True)):
        _, alloc, searched = allocs[budget]
        plan, tag, fallback, losses = checked[budget]
        before = fold_smoothing(model, readers, linears, work, tag, teacher) if shared else []
        qlinears = saved_layers(linears, work, tag)
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
            if world().main:
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
