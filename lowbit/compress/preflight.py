"""Know before you start: a compress job's plan from the model's config and shapes, no weight read.

`dry_run(model, recipe, budgets=...)` reads config.json (or GGUF metadata) and the safetensors headers
(`lowbit.models.shapes`), selects the layers the recipe quantizes on a skeleton on the meta device, and
returns a `DryRun`: parameters, quantized weights, what the decoder blocks leave unquantized, the output
size from the exact stored bits (`lowbit.quantizers.storage_bits`), and predictions of the peak RAM and
work-area disk of the current implementation. On the way it refuses, before any weight is read, what
would otherwise fail after loading or calibrating: an unknown preset or bad recipe, a missing model,
a recipe that selects no layer, a missing calibration file, and a budget below the smallest storage the
candidate grid allows (each layer at its smallest allowed candidate).

The memory model (`peak_ram`, and `streamed_peak_ram` for a safetensors folder, which `lowbit.compress`
streams block by block, with or without a budget) mirrors what `lowbit.compress` holds at each
phase; its constants were fitted on measured runs (`scripts/bench_scale.py`, docs/benchmarks.md "Big
models"), so it is a prediction, labelled as one wherever it is printed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.calibration import find_blocks
from lowbit.calibration.backward import head_tokens
from lowbit.calibration.data import load_text
from lowbit.calibration.sources import FILE_LIKE_SUFFIXES, FILE_SUFFIXES, DataError
from lowbit.compress.allocate import (
    AllocationError,
    budget_bits,
    candidate_bits,
    candidate_grid,
    constraint_mask,
    engine_constraints,
)
from lowbit.compress.budget import with_budget
from lowbit.compress.budget_passes import needs_fisher
from lowbit.compress.budget_stream import streams_budgets
from lowbit.compress.checks import check_dtype
from lowbit.compress.losses import BATCH
from lowbit.compress.plan import allocation_method
from lowbit.compress.presets import resolve_recipe
from lowbit.compress.recipe import Recipe
from lowbit.compress.uniform import block_weights, selected_names
from lowbit.lowrank import METHODS
from lowbit.models.shapes import source_shapes
from lowbit.nn.shards import DEFAULT_MAX_SHARD_BYTES
from lowbit.quantizers import SCALE_DTYPES, storage_bits
from lowbit.quantizers.engines import fused_groups, served_group

# Resident memory of a process that has imported torch, transformers and lowbit (measured: 0.49 GB).
BASE_RSS = 485 << 20
# Resident memory that reading the calibration text adds (builtin:lee-news, tokenised: measured 0.16 GB).
CALIBRATION_TEXT_RSS = 150 << 20
# Samples per micro-batch of `lowbit.calibration.calibrate_sequential` (its batch_size default).
HIDDEN_BATCH = 8
# fp32 [T, V] tensors alive while the block-wise Fisher back-propagates one sample's loss through the
# final norm and lm_head, T positions at a time (`lowbit.calibration.backward`): the logits (and their copy
# in the model's dtype), the log-softmax and their gradients (counted from the code, not fitted).
FISHER_HEAD_COPIES = 4
# Per-file overheads of a checkpoint besides tensors: safetensors header entries, manifest, config.
HEADER_BYTES_PER_TENSOR = 120
MANIFEST_BYTES_PER_LAYER = 400
FIXED_FILE_BYTES = 8 << 10


@dataclass(frozen=True)
class DryRun:
    """The plan of one compress job (sizes in bytes; `peak_ram_bytes` and `work_bytes` are predictions).

    params: every parameter (tied ones once); block_params: weights of the decoder blocks;
    quantized_params: weights of the layers the recipe quantizes; unquantized: names of decoder-block
    weights (matrices: routers, excluded layers or expert tensors; not norms or biases) that stay as
    they are; bits_per_weight: over the quantized weights; block_bits_per_weight: over every
    decoder-block weight, the unquantized ones at their dtype's bits; dtype: of the unquantized tensors
    as loaded and written. bits_per_weight, block_bits_per_weight and output_bytes: one per budget when
    budgets are given. streamed: the job reads its source block by block (`lowbit.compress.stream`).
    """

    model: str
    dtype: str
    source_bytes: int
    params: int
    block_params: int
    quantized_params: int
    layers: int
    unquantized: tuple[str, ...]
    bits_per_weight: tuple[float, ...]
    block_bits_per_weight: tuple[float, ...]
    output_bytes: tuple[int, ...]
    peak_ram_bytes: int
    work_bytes: int
    budgets: tuple[float, ...] = ()
    streamed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def dry_run(
    model: str | nn.Module,
    recipe: Recipe | str | None = None,
    *,
    budget: float | None = None,
    budgets: list[float] | None = None,
    dtype: str | torch.dtype | None = None,
) -> DryRun:
    """The plan of `lowbit.compress(model, recipe, budget=..., budgets=..., dtype=...)`, reading no weight.

    model: a name or path as `compress` takes it, or an nn.Module (its shapes are used as they are).
    dtype: the dtype the job loads the model in and keeps its unquantized tensors in (None: the source's).
    Raises RecipeError, ModelError, CompressError, DataError or AllocationError on what the job would
    fail on later (see the module docstring).
    """
    recipe = resolve_recipe(recipe)
    budgets = tuple(budgets or ([budget] if budget is not None else []))
    if not budgets and recipe.allocate.budget is not None:
        budgets = (recipe.allocate.budget,)
    given = check_dtype(dtype)
    if isinstance(model, str):
        src = source_shapes(model)
        net, dtype, source, tokenizer = src.skeleton, src.dtype, src.stored_bytes, src.tokenizer_bytes
        mapped = src.mapped_bytes
    else:
        net, source, tokenizer, mapped = model, 0, 0, 0
        dtype = next(net.parameters()).dtype
    dtype = given or dtype
    layers = selected_shapes(net, recipe)
    if recipe.needs_calibration() or budgets:
        check_text_source(recipe.calibration.data)
    quantized = sum(n * k for n, k in layers.values())
    unquantized, block_params = block_weights(net, layers)
    left_bits = sum(8 * dtype.itemsize * net.get_parameter(name).numel() for name in unquantized)
    inside = [name for name in layers if name.startswith(find_blocks(net)[0] + ".")]
    if budgets:
        check_budgets(recipe, layers, budgets)
        bits = [budget_bits(b, quantized) for b in budgets]
        block_bits = [b * sum(math.prod(layers[name]) for name in inside) for b in budgets]
    else:
        bits = [sum(layer_bits(recipe, name, shape) for name, shape in layers.items())]
        block_bits = [sum(layer_bits(recipe, name, layers[name]) for name in inside)]
    params = sum(p.numel() for p in net.parameters())
    files = FIXED_FILE_BYTES + tokenizer + MANIFEST_BYTES_PER_LAYER * len(layers)
    files += HEADER_BYTES_PER_TENSOR * (len(net.state_dict()) + 2 * len(layers))
    outputs = tuple(
        other_bytes(net, layers, dtype) + b // 8 + files + untied_bytes(net, recipe, layers, dtype)
        for b in bits
    )
    fisher = "fisher" in METHODS[recipe.decompose.method].needs
    streams = streams_budgets(with_budget(recipe, budgets[0])) if budgets else not fisher
    streamed = isinstance(model, str) and src.direct and recipe.finetune is None and streams  # as compress()
    work = work_bytes(recipe, net, layers, dtype, budgets, bits)
    if streamed:
        ram, stream_work = streamed_peak_ram(recipe, net, layers, dtype, outputs[0], bool(budgets))
        work += stream_work * len(outputs)  # each budget's shards wait in the work area
    else:
        ram = peak_ram(recipe, net, layers, dtype, mapped, max(outputs), bits[-1] // 8, work)
    return DryRun(
        model=model if isinstance(model, str) else type(model).__name__,
        dtype=str(dtype).removeprefix("torch."),
        source_bytes=source,
        params=params,
        block_params=block_params,
        quantized_params=quantized,
        layers=len(layers),
        unquantized=tuple(unquantized),
        bits_per_weight=tuple(b / quantized for b in bits),
        block_bits_per_weight=tuple((b + left_bits) / block_params for b in block_bits),
        output_bytes=outputs,
        peak_ram_bytes=ram,
        work_bytes=work,
        budgets=budgets,
        streamed=streamed,
    )


def selected_shapes(net: nn.Module, recipe: Recipe) -> dict[str, tuple[int, int]]:
    """{name: (N, K)} of the nn.Linear layers the recipe quantizes, in module order."""
    return {
        name: (net.get_submodule(name).out_features, net.get_submodule(name).in_features)
        for name in selected_names(net, recipe)
    }


def layer_bits(recipe: Recipe, name: str, shape: tuple[int, int]) -> int:
    """Exact stored bits of one layer under the recipe's single setting: codes, scales, zeros, L1 L2."""
    lowrank = 8 * SCALE_DTYPES[recipe.decompose.lowrank_dtype].itemsize
    rank = min(recipe.decompose.rank, *shape)
    spec = served_group(recipe.target, recipe.layer_config(name).spec(), shape[1])
    return storage_bits(spec, shape) + rank * sum(shape) * lowrank


def other_bytes(net: nn.Module, layers: dict, dtype: torch.dtype) -> int:
    """Bytes of every stored tensor that is not a quantized weight (tied copies once), floating ones in
    `dtype`: embeddings, norms, lm_head, biases, unquantized block weights."""
    seen, total = set(), 0
    weights = {f"{name}.weight" for name in layers}
    for name, t in net.state_dict(keep_vars=True).items():
        key = id(t)
        if name in weights or key in seen:
            continue
        seen.add(key)
        size = dtype.itemsize if t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total


def untied_bytes(net: nn.Module, recipe: Recipe, layers: dict, dtype: torch.dtype) -> int:
    """Bytes of the lm_head a rotation unties from the embedding (`lowbit.compress.rotation`), unquantized."""
    head = net.get_output_embeddings()
    if recipe.rotate.method == "none" or head is None or head.weight is not net.get_input_embeddings().weight:
        return 0
    name = next(n for n, m in net.named_modules() if m is head)
    return 0 if name in layers else head.weight.numel() * dtype.itemsize


def check_budgets(recipe: Recipe, layers: dict, budgets) -> None:
    """Refuse a budget below the smallest storage the allocation's candidate grid allows (among the
    candidates the recipe's target engine serves)."""
    a = recipe.allocate
    grid = candidate_grid(
        a.formats, a.bits, a.group_sizes, a.ranks, base=recipe.quantize.spec(), symmetric=a.symmetric
    )
    lowrank = 8 * SCALE_DTYPES[recipe.decompose.lowrank_dtype].itemsize
    names, shapes = list(layers), list(layers.values())
    forbid = [(f["match"], {k: v for k, v in f.items() if k != "match"}) for f in a.forbid]
    allowed = constraint_mask(names, grid, pins=a.pins, forbid=forbid, min_bits=a.min_bits)
    allowed &= engine_constraints(names, shapes, grid, recipe.target)[0]  # what the target engine serves
    applies = np.array([[c.rank <= min(s) for c in grid] for s in shapes])
    sizes = np.array([[candidate_bits(c, s, lowrank) for c in grid] for s in shapes], dtype=np.int64)
    ok = allowed & applies
    lo = int(np.where(ok, sizes, np.iinfo(np.int64).max).min(1).sum())
    hi = int(np.where(ok, sizes, -1).max(1).sum())
    params = sum(n * k for n, k in shapes)
    for b in budgets:
        if budget_bits(b, params) < lo:
            raise AllocationError(
                f"budget of {b:g} bits per weight is infeasible: the allowed candidates need between "
                f"{lo / params:.4f} (smallest) and {hi / params:.4f} (largest) bits per weight"
            )


def check_text_source(source: str) -> None:
    """Refuse a calibration source that cannot be read: a missing or unsupported local file, an unknown
    built-in text. Hub datasets are not reached here (that would download them)."""
    if source.startswith("builtin:"):
        load_text(source)
        return
    path = Path(source).expanduser()
    if path.suffix in FILE_LIKE_SUFFIXES or path.exists() or source.startswith((".", "/", "~")):
        if not path.is_file():
            raise DataError(f"calibration text file {source!r} does not exist")
        if path.suffix not in FILE_SUFFIXES:
            raise DataError(f"unsupported text file {source!r}; use one of {', '.join(FILE_SUFFIXES)}")


def work_bytes(
    recipe: Recipe, net: nn.Module, layers: dict, dtype: torch.dtype, budgets, bits: list[int]
) -> int:
    """Predicted work-area disk of a budget run (`lowbit.compress.budget_passes`): each budget's compressed
    layers, and with the Fisher diagonal the hidden states entering every block ([S, L, D] each, saved
    by the forward pass for the backward) and, for a method that reads it, every layer's fp32 Fisher
    [N, K]. The error table's rows are numbers (negligible). The uniform path keeps none (0)."""
    if not budgets:
        return 0
    fisher = 0
    if needs_fisher(with_budget(recipe, budgets[0])):
        cal = recipe.calibration
        fisher = (
            len(find_blocks(net)[1]) * cal.samples * cal.seq_len * net.config.hidden_size * dtype.itemsize
        )
        if "fisher" in METHODS[allocation_method(recipe)].needs:
            fisher += sum(4 * n * k for n, k in layers.values())
    return fisher + sum(bits) // 8


def hidden_bytes(recipe: Recipe, net: nn.Module, size: int) -> tuple[int, int, int]:
    """(all, resident, offloaded) bytes of the calibration hidden states between two blocks ([S, L, D]
    in the model's dtype, `size` bytes per element; zeros without calibration).

    Without calibration.max_hidden_memory, or when they fit under it, they count twice (entering and
    leaving a block); past it, the micro-batches (`calibrate_sequential`'s 8 samples) that fit under
    the limit count twice, the micro-batch in flight twice more (read from disk, and its output), and
    the others are on disk (`lowbit.calibration.hidden`)."""
    cal = recipe.calibration
    if not recipe.needs_calibration():
        return 0, 0, 0
    per_sample = cal.seq_len * net.config.hidden_size * size
    total = cal.samples * per_sample
    limit = cal.max_hidden_memory
    if limit is None or total <= limit:
        return total, 2 * total, 0
    batch = min(HIDDEN_BATCH, cal.samples) * per_sample
    kept = limit // batch * batch
    return total, 2 * kept + 2 * batch, total - kept


def streamed_peak_ram(
    recipe: Recipe, net: nn.Module, layers: dict, dtype: torch.dtype, out: int, budget: bool = False
) -> tuple[int, int]:
    """(predicted peak resident memory, predicted peak work-area disk) of a streamed job: the larger of

    outside:  the tensors outside the blocks (embeddings, final norm, lm_head) in `dtype`, held while the
              first block's inputs are captured and while they are written at the end (+ with calibration,
              the hidden states [S, L, D])
    block:    one decoder block in `dtype` + with calibration, the hidden states entering and leaving the
              block (`hidden_bytes`) + what compressing the block holds besides (`block_work_bytes`; with
              the block-wise Fisher, + the saved hidden states and the tensors outside the blocks, which
              the last block's backward from the loss reads and its error-table rows are computed beside)
    head:     on a budget run, the tensors outside the blocks + the hidden states + what the passes
              through the final norm and lm_head hold (`head_pass_bytes`)
    plus BASE_RSS (and CALIBRATION_TEXT_RSS with calibration). The work area holds every finished shard
    until the end, the finished blocks' parts until they fill a shard (`DEFAULT_MAX_SHARD_BYTES`), at most
    that much again while a shard is written, and, with calibration, the hidden states of the next block
    (and those offloaded past the limit).
    """
    prefix, blocks = find_blocks(net)
    size = dtype.itemsize
    seen, outside = set(), 0
    for name, t in net.state_dict(keep_vars=True).items():
        if not name.startswith(prefix + ".") and id(t) not in seen:
            seen.add(id(t))
            outside += t.numel() * (size if t.is_floating_point() else t.element_size())
    block = max(sum(p.numel() for p in b.parameters()) for b in blocks) * size
    first = f"{prefix}.0."
    inside = {name: s for name, s in layers.items() if name.startswith(first)} or dict(layers)
    saved, hidden, offloaded = hidden_bytes(recipe, net, size)  # saved: the next block's inputs, for a resume
    work = block_work_bytes(recipe, inside, budget)
    if budget and needs_fisher(recipe):  # the last block's rows are computed with the head in memory
        work += saved + outside
    ram = max(outside + hidden // 2, block + hidden + work)
    if budget:
        ram = max(ram, outside + hidden + head_pass_bytes(recipe, net, dtype))
    if recipe.needs_calibration():
        ram += CALIBRATION_TEXT_RSS
    return BASE_RSS + ram, out + min(out, DEFAULT_MAX_SHARD_BYTES) + saved + offloaded


def head_pass_bytes(recipe: Recipe, net: nn.Module, dtype: torch.dtype) -> int:
    """Predicted bytes that a budget run's passes through the final norm and lm_head hold besides the
    tensors outside the blocks (vocabulary V, hidden size D, L = calibration.seq_len), both running the
    lm_head on T = min(positions, `head_tokens(V)`) positions at a time (HEAD_CHUNK_BYTES of fp32
    logits at most): the largest of

    fisher:  with the Fisher diagonal (`needs_fisher`), one sample's backward from its loss (L - 1
             positions): FISHER_HEAD_COPIES fp32 [T, V] (the logits, their log-softmax, their gradients)
    losses:  with probes, penalties or the check (`lowbit.compress.losses`), the hidden states of every
             variant measured in one go ([4, L, D] in `dtype` each: the float model and one per rank-0 spec
             and probed block), one micro-batch's final-norm output [BATCH, L, D] in fp32, and one chunk
             of BATCH (L - 1) positions: fp32 logits [T, V], as much again for their log-softmax, and
             the lm_head's output in `dtype`
    """
    a, L = recipe.allocate, recipe.calibration.seq_len
    V, D = net.config.vocab_size, net.config.hidden_size
    per_chunk = head_tokens(V)
    fisher = FISHER_HEAD_COPIES * 4 * min(L - 1, per_chunk) * V if needs_fisher(recipe) else 0
    losses = 0
    if a.probes or a.penalties or a.check:
        grid = candidate_grid(a.formats, a.bits, a.group_sizes, (0,), base=recipe.quantize.spec())
        variants = 1 + len({c.spec for c in grid}) * max(a.probes, 1)
        chunk = min(BATCH * (L - 1), per_chunk) * V * (8 + dtype.itemsize)
        losses = variants * 4 * L * D * dtype.itemsize + 4 * BATCH * L * D + chunk
    return max(fisher, losses)


def block_work_bytes(recipe: Recipe, inside: dict[str, tuple[int, int]], budget: bool = False) -> int:
    """Predicted bytes that compressing one decoder block holds besides its weights and hidden states,
    for its layers inside = {name: (N, K)} in module order: the largest of

    layer:   4 fp32 copies of a layer's W [N, K] (the weight, GPTQ's or the decomposition's working copy,
             the reconstruction and its error)
    with calibration:
    stats:   the block's distinct input Hessians (one [K, K] fp32 per input: q/k/v share one, gate/up
             share one) + one micro-batch's widest input X [B L, K] in fp32 and its X^T X [K, K], being
             summed in
    rounding: for each input group in turn, the Hessians still alive (its own and the later groups';
             the earlier ones are freed once their layers are built) + the larger of GPTQ's loop (its
             inverse Cholesky factor [K, K] and 2 fp32 copies of W: its working copy and the one it
             was gathered from) and the errors after it (3 fp32 copies: W, the reconstruction and
             their difference); a budget run (`budget`) builds each
             layer from a normalised copy of its Hessian (one more [K, K]) and, when it reads the Fisher
             diagonal, holds the block's fp32 Fisher [N, K] per layer
    """
    copies = 16 * max(n * k for n, k in inside.values())
    if not recipe.needs_calibration():
        return copies
    leader = {name: group[0] for group in fused_groups(list(inside)) for name in group}
    groups: dict[str, tuple[int, int]] = {}  # first reader of each input -> (largest N, K)
    for name, (n, k) in inside.items():
        lead = leader.get(name, name)
        groups[lead] = (max(n, groups.get(lead, (0, k))[0]), k)
    hessians = [4 * k * k for _, k in groups.values()]
    cal = recipe.calibration
    rows = min(HIDDEN_BATCH, cal.samples) * cal.seq_len  # one micro-batch's tokens
    widest = max(k for _, k in groups.values())
    stats = sum(hessians) + 4 * widest * widest + 4 * rows * widest  # + its X^T X and its fp32 X
    extra = 4 if budget else 0  # the normalised copy
    rounding = max(
        sum(hessians[i:]) + extra * k * k + max(4 * k * k + 8 * n * k, 12 * n * k)
        for i, (n, k) in enumerate(groups.values())
    )
    fisher = sum(4 * n * k for n, k in inside.values()) if budget and needs_fisher(recipe) else 0
    return max(copies, stats, rounding) + fisher


def peak_ram(
    recipe: Recipe,
    net: nn.Module,
    layers: dict,
    dtype: torch.dtype,
    mapped: int,
    out: int,
    compressed: int,
    work: int,
) -> int:
    """Predicted peak resident memory in bytes: the largest of the phases below, plus BASE_RSS.

    load:     the model in `dtype` + what the loader keeps memory-mapped (`mapped`: the shards, whose
              pages read count as resident until loading ends, when transformers loads them; nothing
              for a safetensors folder read tensor by tensor, each straight into its own storage)
    quantize: the model + one layer's fp32 copy and its quantization temporaries (about 4 fp32 copies)
              + with calibration, the hidden states entering and leaving a block (`hidden_bytes`: less
              past calibration.max_hidden_memory; all of them on the budget path); the uniform path frees
              each original layer as its compressed one comes in, so that is its largest point; a
              budget run (`work` > 0) also holds every compressed layer of a budget and, with
              fine-tuning, a copy of the model
    save:     the compressed model + its serialised bytes (save_file holds the whole file in memory)
    """
    model = sum(p.numel() for p in net.parameters()) * dtype.itemsize
    largest = max(n * k for n, k in layers.values())
    quantize = model + 16 * largest
    if work:  # the budget path keeps every hidden state in memory
        cal = recipe.calibration
        quantize += 2 * cal.samples * cal.seq_len * net.config.hidden_size * dtype.itemsize
    else:
        quantize += hidden_bytes(recipe, net, dtype.itemsize)[1]
    if work:
        quantize += compressed + (model if recipe.finetune else 0)
    return BASE_RSS + max(model + mapped, quantize, 2 * out)
