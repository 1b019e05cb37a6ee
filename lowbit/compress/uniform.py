"""Compression with one setting for every layer, and the pieces the budget path shares with it.

Every linear layer that the recipe selects becomes a `QLinear` holding W ~ Q + L1 L2 (Q packed low-bit
codes, L1 L2 a high-precision low-rank part, optional SVDQuant smoothing). When the recipe's setting
needs calibration statistics (GPTQ rounding, SVDQuant, Fisher-weighted LQ-LoRA), the model is run block
by block and each block is compressed as soon as its statistics are in; the next block then sees the
compressed block's outputs (GPTQ's sequential protocol). SVDQuant's smoothing of the layers that read a
norm's output is shared per norm and folded into the norm's weight (`lowbit.compress.smoothing`); other
layers keep their own in their QLinear. AWQ's scaling and clipping (`lowbit.compress.awq`) run on each
block before its layers are rounded. The recipe's rotations (`lowbit.compress.rotation`) are folded into
the float model first (a streamed source folds them into each block as it reads it), so every statistic
is of the rotated model.

The model is walked block by block in both cases, through a block provider (`lowbit.compress.blocks`):
for a model in memory it does nothing; for a streamed job (`lowbit.compress.stream`) it reads each block
from disk before its turn, and the job writes and frees it once it is compressed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration import calibrate_sequential, fisher_diagonal
from lowbit.calibration.data import TOKENS_PREFIX, calibration_blocks
from lowbit.calibration.hidden import HiddenStates
from lowbit.calibration.sequential import BlockProvider
from lowbit.calibration.stats import find_blocks, hessians_in_turn
from lowbit.compress.awq import activation_scaling
from lowbit.compress.blocks import InMemory
from lowbit.compress.memory import release_freed_memory
from lowbit.compress.plan import apply_choice, uniform_choice
from lowbit.compress.ranks import build_owned
from lowbit.compress.recipe import Recipe
from lowbit.compress.rotation import BlockRotation, rotate_model
from lowbit.compress.smoothing import compress_norm_groups
from lowbit.lowrank import METHODS, Stats
from lowbit.nn.checkpoint import plan_bits
from lowbit.nn.qlinear import QLinear, set_submodule
from lowbit.nn.smoothing import norm_readers
from lowbit.parallel import share, world


class CompressError(ValueError):
    """The model cannot be compressed as asked (no layer selected, non-finite weights, ...)."""


def select_linears(model: nn.Module, recipe: Recipe) -> dict[str, nn.Linear]:
    """The nn.Linear layers the recipe quantizes, by fully qualified name, in module order."""
    chosen = {name: model.get_submodule(name) for name in selected_names(model, recipe)}
    for name, m in chosen.items():
        if not torch.isfinite(m.weight).all():
            raise CompressError(f"weight of layer {name!r} contains NaN or Inf")
    return chosen


def selected_names(model: nn.Module, recipe: Recipe) -> list[str]:
    """Names of the nn.Linear layers the recipe quantizes, in module order, from the model's structure
    alone (a skeleton on the meta device will do). Refuses a recipe that selects nothing and fused
    expert tensors the recipe does not exclude (they would silently stay in high precision)."""
    chosen = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and recipe.layer_config(name) is not None
    ]
    if not chosen:
        raise CompressError("the recipe selects no linear layer of this model (check 'exclude')")
    fused = [name for name in fused_experts(model) if recipe.layer_config(name) is not None]
    if fused:
        more = f" and {len(fused) - 3} more" if len(fused) > 3 else ""
        raise CompressError(
            f"fused expert tensors cannot be quantized yet: {', '.join(fused[:3])}{more}; "
            "add them to the recipe's 'exclude' to keep them as they are"
        )
    return chosen


def fused_experts(model: nn.Module) -> list[str]:
    """Names of parameters of three or more dimensions (mixture-of-experts weights fused over experts,
    [E, N, K], as transformers stores them), which no nn.Linear holds."""
    return [name for name, p in model.named_parameters() if p.dim() >= 3]


def block_weights(model: nn.Module, quantized: dict[str, tuple[int, int]]) -> tuple[list[str], int]:
    """(names of decoder-block weights left unquantized, number of decoder-block weights in all).

    A block weight is a matrix or larger inside the decoder blocks: linear weights, routers, fused expert
    tensors [E, N, K]; norms and biases are not. quantized: {layer name: (N, K)} of the layers that are
    (or will be) quantized, whose own parameters (a QLinear's low-rank factors) are not counted again.
    """
    prefix = find_blocks(model)[0] + "."
    left = [
        name
        for name, p in model.named_parameters()
        if name.startswith(prefix) and p.dim() >= 2 and name.rpartition(".")[0] not in quantized
    ]
    inside = sum(n * k for name, (n, k) in quantized.items() if name.startswith(prefix))
    return left, inside + sum(model.get_parameter(name).numel() for name in left)


def block_bits_per_weight(model: nn.Module, plan: dict[str, dict]) -> tuple[float, list[str]]:
    """(stored bits per weight over every decoder-block weight, the block weights left unquantized):
    quantized layers count their codes, scales, zeros and low-rank factors, the others their dtype."""
    left, total = block_weights(model, {name: tuple(e["shape"]) for name, e in plan.items()})
    prefix = find_blocks(model)[0] + "."
    bits = plan_bits(model, {name: e for name, e in plan.items() if name.startswith(prefix)})
    bits += sum(8 * p.numel() * p.element_size() for p in map(model.get_parameter, left))
    return bits / total, left


def compress_layer(name: str, linear: nn.Linear, recipe: Recipe, stats: Stats | None = None) -> QLinear:
    """The QLinear for one layer under the recipe's single setting (stats: its normalised Hessian,
    activation maxima and Fisher)."""
    if not torch.isfinite(linear.weight).all():
        raise CompressError(f"weight of layer {name!r} contains NaN or Inf")
    return apply_choice(linear, uniform_choice(recipe, name, linear.in_features), recipe, stats)


class Stream(Protocol):
    """A streamed job (`lowbit.compress.stream`): where blocks come from and where finished ones go.

    provider: materialises and releases blocks (`lowbit.models.stream`); start: the first block still to
    compute (earlier ones were finished by a killed run); hidden: that block's saved inputs, one
    [B, L, D] per micro-batch (None without calibration); plan: the per-layer plan of the finished
    layers; done(index, hidden): block `index` (None: the tensors outside the blocks) is final, with
    the next block's inputs `hidden`; work: the folder for the job's temporary files.
    """

    provider: BlockProvider
    start: int
    hidden: Sequence[torch.Tensor] | None
    plan: dict[str, dict]
    work: Path

    def done(self, index: int | None, hidden: HiddenStates | None) -> None: ...


def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    tokenizer=None,
    *,
    calib_data=None,
    progress: bool = True,
    teacher: nn.Module | None = None,
    stream: Stream | None = None,
) -> dict[str, dict]:
    """Replace the selected linears of `model` in place by QLinears; return the per-layer plan.

    calib_data: LongTensor [S, L] of token blocks; when None and the recipe needs calibration,
    blocks are drawn from recipe.calibration.data with `tokenizer`. With SVDQuant, the layers that read
    a norm's output share one smoothing vector per norm, folded into the norm's weight (and into the
    teacher's, a copy of the original model kept for fine-tuning); see `lowbit.compress.smoothing`.
    stream: the blocks are read, written and freed one at a time (see `Stream`); default: the model is
    whole in memory and stays so. The calibration hidden states past recipe.calibration.max_hidden_memory
    bytes are kept on disk (`lowbit.calibration.hidden`), in the stream's work folder or else the
    system's temporary folder.
    """
    names = selected_names(model, recipe)
    if recipe.rotate.method != "none" and stream is not None:
        if not any(isinstance(f, BlockRotation) for f in getattr(stream.provider, "folds", ())):
            raise CompressError("a streamed source must fold the rotations into each block it reads")
    elif recipe.rotate.method != "none":
        rotate_model(model, recipe.rotate, names)  # QuaRot's rotations, folded before any statistics
        if teacher is not None:  # the same rotations, so that its layers see what the student's do
            rotate_model(teacher, recipe.rotate, names)
    provider = InMemory(model) if stream is None else stream.provider
    start = 0 if stream is None else stream.start
    prefix, blocks = find_blocks(model)
    index = {n: int(n[len(prefix) + 1 :].split(".")[0]) for n in names if n.startswith(prefix + ".")}
    linears = {n: model.get_submodule(n) for n in names if index.get(n, start) >= start}
    # Each original layer is dropped from `linears` (and its Fisher from `fisher`) once its QLinear is in
    # the model, so it is freed then rather than when the last layer is done (peak memory).
    ranks = world()
    if not recipe.needs_calibration():
        for i in tqdm(range(start, len(blocks)), desc="quantize", disable=not progress):
            provider.materialise(i)
            # the block's layers side by side on their owners (one process: all of them, in order)
            block = [n for n in linears if index.get(n) == i]
            built = build_owned(model, block, lambda name: compress_layer(name, linears[name], recipe), ranks)
            for name, q in built:
                set_submodule(model, name, q)
                del linears[name]
                release_freed_memory()
            if stream is not None:
                stream.done(i, None)
            provider.release(i)
    else:
        _calibrated(model, recipe, tokenizer, calib_data, progress, teacher, stream, linears)
    provider.materialise(None)
    for name in list(linears):  # layers outside the blocks (an lm_head the recipe selects)
        set_submodule(model, name, compress_layer(name, linears.pop(name), recipe))
    if stream is not None:
        stream.done(None, None)
    provider.release(None)
    finished = {} if stream is None else stream.plan  # with the layers an earlier run finished
    return {n: finished[n] if n in finished else model.get_submodule(n).layer_plan() for n in names}


def _calibrated(model, recipe, tokenizer, calib_data, progress, teacher, stream, linears) -> None:
    """The calibrating part of `quantize_model`: block by block, each block's layers compressed as soon
    as its statistics are in (AWQ scaling, SVDQuant's shared smoothing, GPTQ rounding)."""
    provider = InMemory(model) if stream is None else stream.provider
    start = 0 if stream is None else stream.start
    names = list(linears)
    if not names:  # every block was finished by an earlier run
        return
    ranks = world()
    if calib_data is None:
        calib_data = calibration_data(recipe, tokenizer)
    fisher, readers = {}, {}
    if "fisher" in METHODS[recipe.decompose.method].needs:
        fisher = fisher_diagonal(model, calib_data, layers=names, progress=progress)
    shared = METHODS[recipe.decompose.method].shares_smoothing
    if shared or recipe.scaling.method != "none":
        with provider.on_demand():
            readers = norm_readers(model, calib_data[:1, :16].to(provider.device))
    smoothed = readers if shared else {}  # the norms SVDQuant folds its smoothing into

    def on_block(index: int, block: nn.Module, block_stats: dict) -> None:
        if scaling is not None:
            scaling(index, block, block_stats)  # AWQ: scales folded into the norms, weights clipped
        done = compress_norm_groups(model, smoothed, linears, block_stats, recipe, teacher)
        pending = [name for name in block_stats if name in linears and name not in done]
        hessian = hessians_in_turn(block_stats, pending)  # each freed once its layers are built

        def build(name: str) -> QLinear:
            st = Stats(H=hessian(name), act_max=block_stats[name].act_max, fisher=fisher.get(name))
            return compress_layer(name, linears[name], recipe, st)

        for name, q in build_owned(model, pending, build, ranks):
            set_submodule(model, name, q)
            fisher.pop(name, None)
            release_freed_memory()
        for name in block_stats:
            linears.pop(name, None)
        release_freed_memory()

    first = share(calib_data.shape[0], ranks).start  # this process's first sample
    with activation_scaling(model, readers, linears, recipe, teacher, start, first) as scaling:
        calibrate_sequential(
            model,
            calib_data,
            stats=("act", "hessian"),
            layers=names,
            on_block=on_block,
            propagate="quantized",
            keep=False,
            progress=progress,
            provider=None if stream is None else provider,
            start=start,
            hidden=None if stream is None else stream.hidden,
            after_block=None if stream is None else stream.done,
            offload_bytes=recipe.calibration.max_hidden_memory,
            offload_dir=None if stream is None else stream.work,
        )


def finetune_stage(
    model, teacher, recipe: Recipe, tokenizer, calib_data, progress: bool, state_dir: Path | None = None
) -> dict:
    """Quantization-aware fine-tuning of the compressed model against the original (the teacher);
    returns the new per-layer plan (L4Q merges its low-rank factors). With `state_dir` the run saves
    its state there and a repeated call resumes from it."""
    from lowbit.compress.finetune import finetune

    config = finetune_config(recipe)
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


def finetune_config(recipe: Recipe):
    """The recipe's FinetuneConfig, its data "calibration" resolved: the calibration text source (read at
    fine-tuning's own samples and seq_len), or None (the calibration blocks) when the job was given tokens."""
    from lowbit.compress.finetune import FinetuneConfig
    from lowbit.compress.finetune.config import CALIBRATION

    config = FinetuneConfig.from_dict(recipe.finetune)
    if config.data != CALIBRATION:
        return config
    source = recipe.calibration.data
    text = isinstance(source, str) and not source.startswith(TOKENS_PREFIX)
    # the objective "calibration" implies (distill unless set), kept once the source is filled in
    return replace(config, data=source if text else None, objective=config.resolved_objective())


def calibration_data(recipe: Recipe, tokenizer) -> torch.Tensor:
    """Token blocks [samples, seq_len] from the recipe's calibration source."""
    cal = recipe.calibration
    if tokenizer is None:
        raise CompressError("this recipe needs calibration data: pass a tokenizer or token blocks")
    return calibration_blocks(tokenizer, cal.data, cal.samples, cal.seq_len, seed=cal.seed)
