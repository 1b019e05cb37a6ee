"""The compress pipeline: calibrate -> decompose -> allocate -> finetune -> pack.

`compress` is the entry point. Without a budget every layer takes the recipe's one setting
(`lowbit.compress.uniform`); with a budget (`allocate.budget`, or several budgets at once) an ILP picks a
format, group size and rank per layer and the stages are resumable (`lowbit.compress.budget`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from lowbit.calibration.data import TOKENS_PREFIX, calibration_blocks
from lowbit.compress.blocks import StreamedFolder
from lowbit.compress.budget import budget_outs, compress_to_budgets, with_budget, work_area
from lowbit.compress.budget_stream import compress_streamed_budgets, streams_budgets
from lowbit.compress.checks import (
    ArgumentError,
    calibrates,
    check_budgets,
    check_device,
    check_dtype,
    check_source,
)
from lowbit.compress.plan import check_fused
from lowbit.compress.presets import resolve_recipe
from lowbit.compress.recipe import Recipe
from lowbit.compress.rotation import BlockRotation
from lowbit.compress.stream import StreamedJob, stream_work_area
from lowbit.compress.uniform import finetune_stage, quantize_model, selected_names
from lowbit.lowrank import METHODS
from lowbit.models import check_model, load_model
from lowbit.models.source import open_folder, streams_folder
from lowbit.nn.atomic import OWNED_MARKERS, atomic_folder, check_output, hold_lock, is_owned
from lowbit.nn.checkpoint import finish_checkpoint, plan_bits, save
from lowbit.nn.manifest import CheckpointError, read_manifest
from lowbit.nn.shards import DEFAULT_MAX_SHARD_BYTES, parse_size
from lowbit.parallel import barrier, processes, rank_device, world

logger = logging.getLogger(__name__)


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


def _in_processes(fn):
    """Run fn inside the job's process group (`lowbit.parallel.processes`) when torchrun started it."""

    @functools.wraps(fn)
    def run(*args, device=None, **kwargs):
        with processes(device):
            return fn(*args, device=device, **kwargs)

    return run


@_in_processes
def compress(
    model_or_id: str | nn.Module,
    recipe: Recipe | str | None = None,
    out: str | Path | None = None,
    *,
    data: str | torch.Tensor | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    budget: float | None = None,
    budgets: list[float] | None = None,
    target: str | None = None,
    tokenizer=None,
    calib_data: torch.Tensor | None = None,
    overwrite: bool = False,
    restart: bool = False,
    work_dir: str | Path | None = None,
    progress: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
    keep_work: bool = False,
    max_work_size: int | str | None = None,
) -> tuple[nn.Module, CompressReport]:
    """Compress a model (a name, a path or a loaded transformers model) with `recipe`: a Recipe, a
    preset name (`lowbit.compress.presets.PRESETS`) or a recipe file (.yaml / .json); default int4-g128.

        model, report = compress("smollm2-135m", "int3-g128-gptq", data="builtin:lee-news", samples=32,
                                 seq_len=256, device="cuda", out="out/int3")

    data: the calibration text source (a name, see `lowbit.calibration.data`) or token blocks
    [samples, seq_len] (`calib_data` is the same for tensors); samples / seq_len override the recipe's
    calibration section. A recipe that reads no calibration data refuses them. device: where the
    model is compressed (cpu, cuda, cuda:N); dtype: the dtype the source model is loaded in (None: its
    own; a bf16 folder stays bf16, GGUF files load in float32).

    budget / budgets (average bits per weight; default the recipe's allocate.budget): allocate a format, group
    size and rank per layer by ILP. With several budgets, `out` becomes a folder holding one checkpoint per
    budget (`bpw-<budget>`); the same call resumes, keeping the budgets already written. The work area
    (`work_dir`, default `.lowbit-work` beside `out`) keeps finished stages so that the same command resumes
    after a kill or an error; it is removed after success unless `keep_work`, which lets a later call with a
    new budget reuse the calibration and error table, and its size after each budget is in the report
    (`budgets[i]["work_bytes"]`). `max_work_size` (bytes, or a size such as "50GB") stops the job with
    `WorkAreaFull` once the work area grows past it (its files kept: a larger limit resumes); `restart`
    discards it. target (default the recipe's, "lowbit"): the engine that will serve the checkpoint, "vllm" or
    "llama.cpp": layers take only specs it serves (a uniform recipe's group size falls back per layer to one
    the engine serves; an allocation chooses among the candidates it serves and ties each fused q/k/v and
    gate/up group to one candidate), so that `lowbit export` writes them as they are (see
    `lowbit.quantizers.engines`). Every argument is checked before the model is loaded; `out` and the work
    area are locked against a second job. Checkpoints are never half-written; their tensors go to shards of at
    most `max_shard_size` (bytes, or a size such as "2GB"). Returns the compressed model (the last budget's)
    and the report.

    A local safetensors folder compressed into `out` is streamed (`lowbit.compress.stream`, and
    `lowbit.compress.budget_stream` with budgets): one decoder block in memory at a time, read from the
    shards, compressed on `device`, written to the work area and freed; a killed job resumes at the
    block where it stopped. The model returned is then the skeleton, its weights on the meta device:
    `lowbit.load(out)` reads the checkpoint. Recipes that fine-tune, uniform recipes that need Fisher
    weights (a whole-model backward pass) and budget recipes with SVDQuant's shared smoothing load the
    whole model, as do GGUF files and models given in memory. Rotations are folded into each block as it
    is read (`lowbit.compress.rotation.BlockRotation`).

    Under torchrun (`lowbit compress --nproc N`) the processes share the work: each calibrates on its
    share of the samples, the statistics are summed, each layer is compressed by one process and sent
    to the others, and rank 0 writes (`lowbit.parallel`); every process returns the same model.
    """
    t0 = time.perf_counter()
    budgets = check_budgets(list(budgets or ([budget] if budget is not None else [])))
    recipe = resolve_recipe(recipe, budgets, streams_folder(model_or_id, out), target)
    if target is not None:
        recipe = replace(recipe, target=target)  # validated by the recipe
    if not budgets and recipe.allocate.budget is not None:
        budgets = [recipe.allocate.budget]
    recipe, calib_data = _calibration(recipe, budgets, data, calib_data, samples, seq_len)
    ranks = world()
    device, dtype = rank_device(check_device(device), ranks), check_dtype(dtype)
    max_shard = parse_size(max_shard_size)
    max_work = None if max_work_size is None else parse_size(max_work_size, "max_work_size")
    area = dict(keep_work=keep_work, max_work_bytes=max_work)
    if isinstance(model_or_id, str):
        check_model(model_or_id)
    outs, written = _outputs(out, recipe, budgets, overwrite)
    lock = hold_lock(Path(out)) if out is not None and ranks.main else contextlib.nullcontext()
    with lock:
        streamed = _streamed(model_or_id, recipe, budgets, out, device, dtype)
        if streamed is not None:
            source, tokenizer = streamed
            model = source.model
        else:
            model, tokenizer = _source(model_or_id, tokenizer, device, dtype)
        if calib_data is None and not isinstance(recipe.calibration.data, str):
            cal = recipe.calibration  # a data object the recipe cannot record: blocks made here
            calib_data = calibration_blocks(tokenizer, cal.data, cal.samples, cal.seq_len, seed=cal.seed)
            recipe = replace(recipe, calibration=replace(cal, data=_tokens_name(calib_data)))
        logger.info("model loaded in %.1f s", time.perf_counter() - t0)
        name = model_or_id if isinstance(model_or_id, str) else type(model_or_id).__name__
        report = CompressReport(model=name, recipe=recipe.to_dict())
        if budgets:
            unwritten = [None if o is None or o in written else o for o in outs]
            job = dict(tokenizer=tokenizer, calib_data=calib_data, overwrite=overwrite, progress=progress)
            if streamed is not None:
                settings = dict(dtype=str(source.dtype), device=str(device), max_shard_bytes=max_shard)
                with work_area(
                    model_or_id, recipe, out, work_dir, restart, settings=settings, **area
                ) as work:
                    job |= dict(outs=outs, written=written, name=model_or_id, max_shard_bytes=max_shard)
                    run = (source, recipe, budgets, work)
                    results = _timed(f"{len(budgets)} budgets", compress_streamed_budgets, *run, **job)
            else:
                with work_area(model_or_id, recipe, out, work_dir, restart, **area) as work:
                    run = (model, recipe, budgets, work)
                    results = _timed(
                        f"{len(budgets)} budgets", compress_to_budgets, *run, outs=unwritten, **job
                    )
            for r, o in zip(results, outs, strict=True):
                r.out = None if o is None else str(o)
            report.budgets = [r.__dict__ for r in results]
            plan = results[-1].plan
        elif streamed is not None:
            check_fused(recipe, model)  # the skeleton: names and shapes only
            settings = dict(dtype=str(dtype), device=str(device), max_shard_bytes=max_shard)
            job = (source, recipe, tokenizer, calib_data, out, overwrite, progress, work_dir, restart)
            plan, bits = _timed("streamed compression", _compress_streamed, *job, settings, area)
        else:
            check_fused(recipe, model)
            teacher = copy.deepcopy(model) if recipe.finetune else None
            job = dict(calib_data=calib_data, progress=progress, teacher=teacher)
            plan = _timed("calibration and compression", quantize_model, model, recipe, tokenizer, **job)
            if teacher is not None:
                job = (model, teacher, recipe, tokenizer, calib_data, progress)
                plan = _timed("fine-tuning", finetune_stage, *job)
            if out is not None and ranks.main:  # rank 0 writes for the job
                job = dict(plan=plan, recipe=recipe.to_dict(), tokenizer=tokenizer, overwrite=overwrite)
                _timed(f"writing {out}", save, model, out, max_shard_bytes=max_shard, **job)
    barrier(ranks)  # every process returns once the checkpoint is written
    report.layers = plan
    report.quantized_params = sum(math.prod(e["shape"]) for e in plan.values())
    if budgets and streamed is not None:  # the skeleton holds no layer: counted from the parts
        report.bits_per_weight = results[-1].bits_per_weight
    else:
        bits = bits if streamed is not None else plan_bits(model, plan)
        report.bits_per_weight = bits / report.quantized_params
    report.out = None if out is None else str(out)
    report.seconds = time.perf_counter() - t0
    logger.info("compressed in %.1f s: %.3f bits per weight", report.seconds, report.bits_per_weight)
    return model, report


def _streamed(model_or_id, recipe: Recipe, budgets, out, device, dtype):
    """(block provider, tokenizer) when the job streams its source block by block (see `compress`)."""
    if not isinstance(model_or_id, str) or out is None or recipe.finetune is not None:
        return None
    if budgets and not streams_budgets(with_budget(recipe, budgets[0])):
        return None
    if not budgets and "fisher" in METHODS[recipe.decompose.method].needs:  # the budget path streams it
        return None
    found = open_folder(model_or_id, dtype)
    if found is None:
        return None
    skeleton, headers, dtype, tokenizer = found
    source = StreamedFolder(skeleton, headers, dtype, device or torch.device("cpu"))
    if recipe.rotate.method != "none":  # folded into each part as it is read
        source.folds.append(BlockRotation(skeleton, recipe.rotate, selected_names(skeleton, recipe)))
    return source, tokenizer


def _compress_streamed(
    source, recipe, tokenizer, calib_data, out, overwrite, progress, work_dir, restart, settings, area
) -> tuple[dict, int]:
    """Compress a streamed source into `out` through its work area; (plan, stored bits of the layers).
    area: keep_work and max_work_bytes of `stream_work_area`."""
    model = source.model
    name = model.config.name_or_path
    ranks = world()
    with stream_work_area(name, recipe.to_dict(), out, work_dir, restart, ranks, **area, **settings) as work:
        job = StreamedJob(source, work, settings["max_shard_bytes"], ranks)
        if job.start:
            logger.info("resuming at block %d of %d", job.start, len(source.blocks))
        run = dict(calib_data=calib_data, progress=progress, stream=job)
        plan = quantize_model(model, recipe, tokenizer, **run)
        if ranks.main:
            with atomic_folder(out, overwrite) as tmp:
                job.finish(tmp)
                finish_checkpoint(tmp, model.config, tokenizer, plan, recipe.to_dict(), job.bits, name)
    return plan, job.bits


def _timed(what: str, stage, *args, **kwargs):
    """stage(*args, **kwargs), its time logged."""
    t = time.perf_counter()
    result = stage(*args, **kwargs)
    logger.info("%s: %.1f s", what, time.perf_counter() - t)
    return result


def _calibration(recipe, budgets, data, calib_data, samples, seq_len) -> tuple[Recipe, torch.Tensor | None]:
    """The recipe with `data`, `samples` and `seq_len` applied to its calibration section, and the token
    blocks (`data` as a tensor, or `calib_data`). `data`, `samples` or `seq_len` given to a job that reads
    no calibration data are refused; `calib_data` is then unused (callers pass one set of blocks to many
    recipes)."""
    if isinstance(data, torch.Tensor):
        if calib_data is not None:
            raise ArgumentError("give token blocks as data or as calib_data, not both")
        calib_data = data
    given = [k for k, v in (("data", data), ("samples", samples), ("seq_len", seq_len)) if v is not None]
    probe = with_budget(recipe, budgets[0]) if budgets else recipe
    if given and not calibrates(probe):
        raise ArgumentError(
            "this recipe reads no calibration data (no GPTQ, SVDQuant, Fisher weights or fine-tuning); "
            f"drop {', '.join(given)}"
        )
    for key, v in (("samples", samples), ("seq_len", seq_len)):
        if v is not None and not (isinstance(v, int) and v >= (1 if key == "samples" else 2)):
            raise ArgumentError(f"{key} must be a positive integer, got {v!r}")
    cal = recipe.calibration
    if calib_data is not None:
        if calib_data.dim() != 2 or calib_data.dtype not in (torch.int64, torch.int32):
            raise ArgumentError(
                f"token blocks must be an integer tensor [samples, seq_len], got {calib_data}"
            )
        if samples is not None or seq_len is not None:
            raise ArgumentError("token blocks fix samples and seq_len; give neither with them")
        if isinstance(data, torch.Tensor):  # recorded as what they are, so no work area mixes two
            rows, cols = calib_data.shape
            cal = replace(cal, data=_tokens_name(calib_data), samples=rows, seq_len=cols)
        return replace(recipe, calibration=cal), calib_data
    cal = replace(cal, samples=samples or cal.samples, seq_len=seq_len or cal.seq_len)
    if data is not None:
        if isinstance(data, str):
            check_source(data)
        cal = replace(cal, data=data)
    return replace(recipe, calibration=cal), None


def _tokens_name(blocks: torch.Tensor) -> str:
    """The recipe's name for in-memory token blocks: a digest, so the work area never mixes two."""
    digest = hashlib.sha256(blocks.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    return f"{TOKENS_PREFIX}{digest}"


def _outputs(out, recipe: Recipe, budgets: list[float], overwrite: bool) -> tuple[list, set]:
    """(checkpoint folder per budget, those already written by an earlier run of the same job).

    With several budgets an existing `out` written by lowbit resumes: a budget whose checkpoint holds the
    same recipe is kept, any other existing folder needs overwrite.
    """
    if out is None:
        return [None] * len(budgets), set()
    out = Path(out)
    resumable = is_owned(out) and not any((out / m).exists() for m in OWNED_MARKERS)  # a folder of budgets
    if len(budgets) < 2 or overwrite or not resumable:
        check_output(out, overwrite)
    outs = budget_outs(out, budgets) if budgets else [out]
    written = set()
    for o, b in zip(outs, budgets, strict=False):
        if len(budgets) > 1 and not overwrite and _holds(o, with_budget(recipe, b)):
            written.add(o)
        elif o != out:
            check_output(o, overwrite)
    return outs, written


def _holds(folder: Path, recipe: Recipe) -> bool:
    try:
        return read_manifest(folder)["recipe"] == recipe.to_dict()
    except CheckpointError:
        return False


def _source(model_or_id, tokenizer, device, dtype) -> tuple[nn.Module, object]:
    """(model in eval mode on `device` in `dtype`, tokenizer) from a name or a loaded model."""
    if isinstance(model_or_id, str):
        model, tokenizer = load_model(model_or_id, dtype)  # None: the source's own dtype
        model.config.name_or_path = model_or_id  # the source the model card names
    else:
        model = model_or_id if dtype is None else model_or_id.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer
