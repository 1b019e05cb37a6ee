"""The budget path over a streamed source: a safetensors folder compressed to one or more budgets with one
decoder block in memory at a time.

The two passes of `lowbit.compress.budget_passes` read each block from the shards when its turn comes
(`lowbit.compress.blocks.StreamedFolder`) and free it after; AWQ's folds are replayed on each read. In
the second pass each finished block is written once per budget as a part of that budget's output
(`lowbit.compress.stream.StreamedJob`, one under `<tag>-stream/` in the work area per budget), packed
into shards as the blocks finish; the checkpoints appear atomically at the end. A killed job resumes:
the saved rows and layers are reused, and each budget's output continues at its first block without a
part (`LOWBIT_TEST_KILL_AFTER_BLOCK` kills after a block's part, as on the uniform path).

`allocate.probes`, `allocate.penalties` and `allocate.check` measure the calibration loss of variants
of the model block by block (`lowbit.compress.losses.streamed_losses`: the hidden states of the
calibration samples carried through the blocks, each block read once for all variants), with the same
numbers as the model in memory. With the check, the second pass builds every budget's layers and its
uniform spec's into the work area without writing; once the losses have chosen, a third pass reads each
block again and writes the chosen layers (`write_pass`). The recipe's rotations are folded into each
block as it is read (`lowbit.compress.rotation.BlockRotation`). Fine-tuning trains the whole model, and
SVDQuant's shared smoothing is folded into the norms per budget: recipes with them load the whole model
instead (`lowbit.compress.api`).
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
from pathlib import Path

import torch

from lowbit.compress.budget import (
    BudgetResult,
    check_stage,
    plans_for,
    probe_stage,
    saved_layers,
    search_stage,
    table_stage,
    with_budget,
)
from lowbit.compress.budget_passes import ScaledBlocks, apply_pass
from lowbit.compress.losses import block_layers, cached, streamed_losses
from lowbit.compress.plan import allocation_method
from lowbit.compress.recipe import Recipe
from lowbit.compress.stream import StreamedJob
from lowbit.compress.uniform import calibration_data, selected_names
from lowbit.compress.workarea import WorkArea
from lowbit.lowrank import METHODS
from lowbit.nn.atomic import atomic_folder
from lowbit.nn.checkpoint import checkpoint_info, finish_checkpoint
from lowbit.nn.manifest import read_manifest
from lowbit.nn.qlinear import set_submodule
from lowbit.nn.smoothing import norm_readers
from lowbit.parallel import barrier, world

logger = logging.getLogger(__name__)


def streams_budgets(recipe: Recipe) -> bool:
    """Whether a budget recipe runs block by block from a folder (module docstring)."""
    shared = METHODS[allocation_method(recipe)].shares_smoothing
    return not (recipe.finetune is not None or shared)


def _job_area(work: WorkArea, tag: str) -> WorkArea:
    """The work area of one budget's output (created by rank 0 first, then opened by the others)."""
    ranks = world()
    if ranks.main:
        area = work.sub(f"{tag}-stream", {"output": tag})
    barrier(ranks)
    if not ranks.main:
        area = work.sub(f"{tag}-stream", {"output": tag})
    return area


def compress_streamed_budgets(
    source,
    recipe: Recipe,
    budgets: list[float],
    work: WorkArea,
    *,
    outs: list[Path],
    written: set,
    name: str,
    tokenizer=None,
    calib_data=None,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_bytes: int,
) -> list[BudgetResult]:
    """calibrate -> error table -> allocate -> quantize -> pack for every budget, the model `source`
    (a `StreamedFolder`) read one block at a time; returns one BudgetResult per budget. outs: each
    budget's checkpoint folder; written: those an earlier run of the job wrote (kept as they are)."""
    model = source.model
    linears = {n: model.get_submodule(n) for n in selected_names(model, recipe)}
    recipe = with_budget(recipe, budgets[0])
    a = recipe.allocate
    if calib_data is None and (a.probes or a.penalties or a.check or recipe.needs_calibration()):
        calib_data = calibration_data(recipe, tokenizer)
    readers = {}
    if recipe.scaling.method != "none":
        with source.on_demand():  # which linears read which norm, traced on 16 token ids
            n_vocab = model.get_input_embeddings().num_embeddings
            readers = norm_readers(model, (torch.arange(16) % n_vocab)[None].to(source.device))
    provider = ScaledBlocks(source, readers, linears, work)
    table = table_stage(model, provider, linears, recipe, calib_data, work, progress, readers)
    offload = dict(offload_bytes=recipe.calibration.max_hidden_memory, offload_dir=work.dir)
    run = cached(functools.partial(streamed_losses, model, provider, **offload), work)
    table = probe_stage(model, linears, table, recipe, calib_data, work, run)
    search = search_stage(model, linears, recipe, calib_data, run)
    allocs, plans, uniforms = plans_for(table, recipe, budgets, search)
    jobs = {
        f"bpw-{b:g}": StreamedJob(source, _job_area(work, f"bpw-{b:g}"), max_shard_bytes, world())
        for b, out in zip(budgets, outs, strict=True)
        if out not in written
    }
    for tag, job in jobs.items():
        if job.start:
            logger.info("%s: resuming its output at block %d of %d", tag, job.start, len(source.blocks))

    def write(index: int | None, built: dict) -> None:
        """Each budget's part of block `index` (None: the tensors outside the blocks)."""
        for tag, job in jobs.items():
            if index is not None and index < job.start:
                continue  # written by an earlier run
            for layer, q in built[tag].items():
                set_submodule(model, layer, q)
            job.done(index, None)
            for layer in built[tag]:
                set_submodule(model, layer, linears[layer])

    checked = {}
    if jobs and a.check:  # every layer set built, measured, then the chosen ones written
        made = [b for b in budgets if f"bpw-{b:g}" in jobs]
        uniforms = {b: uniforms[b] for b in made}
        tags = set(jobs) | {u[0] for u in uniforms.values() if u is not None}
        plans = {tag: plan for tag, plan in plans.items() if tag in tags}
        apply_pass(model, provider, linears, recipe, plans, calib_data, work, progress, readers)
        barrier(world())  # the layers rank 0 saved are there for every process
        checked = check_stage(model, linears, work, {b: allocs[b] for b in made}, uniforms, calib_data, run)
        chosen = {f"bpw-{b:g}": checked[b][1] for b in made}
        write_pass(provider, linears, work, chosen, {tag: job.start for tag, job in jobs.items()}, write)
    elif jobs:
        plans = {tag: plan for tag, plan in plans.items() if tag in jobs}
        apply_pass(model, provider, linears, recipe, plans, calib_data, work, progress, readers, done=write)
    results = []
    for budget, out in zip(budgets, outs, strict=True):
        plan, alloc, searched = allocs[budget]
        _, _, fallback, losses = checked.get(budget, (None, None, None, None))
        tag = f"bpw-{budget:g}"
        params = sum(math.prod(linears[n].weight.shape) for n in plan)
        r = BudgetResult(budget, {}, 0.0, float(alloc.error), alloc.status, float(alloc.seconds))
        r.fallback, r.losses = fallback, {**searched, **(losses or {})} or None
        job = jobs.get(tag)
        if job is None:
            r.plan, r.out = read_manifest(out)["layers"], str(out)
            r.bits_per_weight = checkpoint_info(out)["totals"]["bits_per_weight"]
        else:
            r.plan, r.bits_per_weight, r.out = job.plan, job.bits / params, str(out)
            if world().main:
                with atomic_folder(out, overwrite) as tmp:
                    job.finish(tmp)
                    used = with_budget(recipe, budget).to_dict()
                    finish_checkpoint(tmp, model.config, tokenizer, job.plan, used, job.bits, name)
                shutil.rmtree(work.path(f"{tag}-stream"))
            barrier(world())
        r.work_bytes = work.size()
        results.append(r)
    return results


def write_pass(
    provider, linears, work: WorkArea, chosen: dict[str, str], starts: dict[str, int], write
) -> None:
    """Each block read again (those every output has already written skipped) and handed to write(index,
    {output tag: {name: QLinear}}) with the layers the second pass saved under each output's chosen tag
    ({output tag: saved tag}); then the tensors outside the blocks (index None)."""
    prefix = provider.prefix
    for i in range(min(starts.values(), default=0), len(provider.blocks)):
        provider.materialise(i)
        names = block_layers(linears, prefix, i)
        write(
            i, {tag: saved_layers({n: linears[n] for n in names}, work, src) for tag, src in chosen.items()}
        )
        provider.release(i)
    provider.materialise(None)
    names = block_layers(linears, prefix, None)
    write(None, {tag: saved_layers({n: linears[n] for n in names}, work, src) for tag, src in chosen.items()})
    provider.release(None)
