"""Run a decoder-only transformer block by block over calibration tokens, collecting per-layer statistics.

GPTQ's sequential protocol (Frantar et al. 2022): the inputs of the first decoder block are captured once
(a hook on the block records them and stops the model's forward there), then each block in turn runs those
inputs with hooks on its linear layers, and its outputs become the next block's inputs. Only one set of
hidden states ([S, L, D]) and the activations of one micro-batch inside one block are alive at a time, so
memory does not grow with depth.

The blocks' other inputs (attention mask, position_embeddings (cos, sin), position_ids, ...) are computed
once by the model and reused for every block; models whose blocks differ in attention kind
(config.layer_types, e.g. sliding-window layers) get the inputs of the first block of each kind.

After a block's statistics are in, `on_block(index, block, block_stats)` may replace the block's linears
(by quantized ones, say). With propagate="quantized" the next block then sees the outputs of the modified
block, so later layers are calibrated on the errors earlier ones make (GPTQ's protocol); with
propagate="original" it sees the outputs of the unmodified block.

The hidden states between two blocks stay in memory up to `offload_bytes` and go to disk past it
(`lowbit.calibration.hidden`), bit for bit.

A block provider (`lowbit.models.stream`) lets the blocks live on disk: block i is materialised just
before its turn and released once it is done, and the capture runs with each block read on demand; the
run may start at a later block with the hidden states an earlier run saved (`start`, `hidden`,
`after_block`), which is how a killed job resumes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.calibration.data import DataError, calibration_blocks
from lowbit.calibration.hidden import HiddenStates
from lowbit.calibration.stats import (
    CalibrationError,
    CalibrationStats,
    LayerFilter,
    LayerStats,
    check_kinds,
    check_tokens,
    find_blocks,
    fisher_diagonal,
    rank_share,
    reduce_stats,
    select_linears,
)
from lowbit.parallel import world

PROPAGATE = ("quantized", "original")
DEFAULT_SOURCE = "builtin:lee-news"

OnBlock = Callable[[int, nn.Module, dict[str, LayerStats]], None]
AfterBlock = Callable[[int, HiddenStates], None]


class BlockProvider(Protocol):
    """Where the decoder blocks' weights come from (`lowbit.models.stream`): `materialise(i)` before block
    i runs, `release(i)` once it is done; `on_demand()` while the whole model's forward runs."""

    def materialise(self, index: int | None) -> None: ...

    def release(self, index: int | None) -> None: ...

    def on_demand(self) -> contextlib.AbstractContextManager: ...


class _Captured(Exception):
    """Raised by the capture hook once a block's inputs are recorded, to stop the model's forward there."""


@dataclass(eq=False)
class BlockInputs:
    """What the model passes its decoder blocks for one micro-batch.

    hidden:  [B, L, D] hidden states entering the first block (None when they are kept in a HiddenStates)
    context: per attention kind, the block's other positional args and keyword args (attention mask,
             position_embeddings (cos, sin), position_ids, cache_position, ...)
    by_name: the hidden states go in as the keyword `hidden_states` rather than the first positional arg
    """

    hidden: Tensor | None
    context: dict[str, tuple[tuple, dict]]
    by_name: bool = False

    def run(self, block: nn.Module, kind: str, hidden: Tensor) -> Tensor:
        """The block's output hidden states [B, L, D] on these inputs with `hidden` [B, L, D] entering it."""
        args, kwargs = self.context[kind]
        if self.by_name:
            out = block(*args, hidden_states=hidden, **kwargs)
        else:
            out = block(hidden, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def block_kinds(model: nn.Module, n: int) -> list[str]:
    """Attention kind of each of the n blocks: config.layer_types when set, else one kind for all."""
    types = getattr(model.config, "layer_types", None)
    if not types or len(types) < n:
        return ["all"] * n
    return [str(t) for t in types[:n]]


def _split_hidden(args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict, bool]:
    """(hidden states, other args, other kwargs, hidden passed by name) of one block call."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs), False
    if "hidden_states" in kwargs:
        rest = dict(kwargs)
        return rest.pop("hidden_states"), (), rest, True
    raise CalibrationError(
        "a decoder block was called without hidden states (positional or 'hidden_states=')"
    )


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    kinds: list[str],
    data: Tensor,
    batch_size: int,
    hidden: HiddenStates | None = None,
) -> list[BlockInputs]:
    """Run the model on each micro-batch of data [S, L] up to the first block of every attention kind.

    Returns the inputs of block 0 (and the context each attention kind gets), one entry per micro-batch;
    with `hidden`, the hidden states go there as each micro-batch is captured (the entries hold None).
    """
    firsts: dict[str, int] = {}
    for i, kind in enumerate(kinds):
        firsts.setdefault(kind, i)
    last = max(firsts.values())
    record: dict[str, tuple] = {}

    def hook(index: int, kind: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        record[kind] = _split_hidden(args, kwargs)
        if index == last:
            raise _Captured

    handles = [
        # prepended: the forward stops before a block provider's hook reads the block it would not run
        blocks[i].register_forward_pre_hook(partial(hook, i, k), with_kwargs=True, prepend=True)
        for k, i in firsts.items()
    ]
    device = model.get_input_embeddings().weight.device
    inputs = []
    try:
        for start in range(0, data.shape[0], batch_size):
            record.clear()
            try:
                model(input_ids=data[start : start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
            if len(record) < len(firsts):
                raise CalibrationError(f"the model's forward never called its decoder block {last}")
            states, _, _, by_name = record[kinds[0]]
            if hidden is not None:
                hidden.append(states)
                states = None
            inputs.append(BlockInputs(states, {k: (r[1], r[2]) for k, r in record.items()}, by_name))
            record.clear()
    finally:
        for h in handles:
            h.remove()
    return inputs


class _Recorder:
    """Forward pre-hooks folding each linear's input x: [B, L, K] into its statistics, once per distinct
    input: layers that read the same tensor (q/k/v, gate/up) share the first reader's statistics, so
    their Hessian is computed and held once."""

    def __init__(self, names, kinds: tuple[str, ...]) -> None:
        self.stats = {name: LayerStats() for name in names}
        self.kinds = kinds
        self.leader: dict[str, str] = {}  # a layer -> the first layer that read the same input
        self.seen: dict[int, tuple[str, Tensor]] = {}  # this micro-batch: id(x) -> (first reader, x)

    def __call__(self, name: str, module: nn.Module, args: tuple) -> None:
        if not args:
            raise CalibrationError(f"{type(module).__name__} was called without a positional input")
        x = args[0]
        first = self.seen.setdefault(id(x), (name, x))[0]  # x is kept alive, so its id is not reused
        if self.leader.setdefault(name, first) != first:
            raise CalibrationError(f"{name} read a different input than in the first micro-batch")
        if first == name:
            self.stats[name].update(x, self.kinds)

    def next_batch(self) -> None:
        self.seen.clear()

    def result(self) -> dict[str, LayerStats]:
        """{name: LayerStats}; a layer that shares its input holds the first reader's tensors."""
        out = dict(self.stats)
        for name, first in self.leader.items():
            if first != name:
                lead = self.stats[first]
                out[name] = LayerStats(lead.act_max, lead.act_sqmean, lead.hessian, lead.tokens)
        return out


@torch.no_grad()
def _run_block(
    block: nn.Module,
    kind: str,
    inputs: list[BlockInputs],
    hidden: HiddenStates,
    linears: dict[str, nn.Module],
    kinds: tuple[str, ...],
    write: bool,
) -> dict[str, LayerStats]:
    """Run every micro-batch through `block` with hooks on `linears`.

    The block's outputs replace the micro-batches' hidden states when `write`.
    """
    recorder = _Recorder(linears, kinds)
    handles = [m.register_forward_pre_hook(partial(recorder, name)) for name, m in linears.items()]
    try:
        for j, inp in enumerate(inputs):
            out = inp.run(block, kind, hidden[j])  # [B, L, D]
            recorder.next_batch()
            if write:
                hidden[j] = out
            del out  # a discarded output must not outlive its micro-batch
    finally:
        for h in handles:
            h.remove()
    return recorder.result()


def calibrate_sequential(
    model: nn.Module,
    data: Tensor,
    stats: tuple[str, ...] = ("act", "hessian"),
    layers: LayerFilter = None,
    on_block: OnBlock | None = None,
    propagate: str = "quantized",
    batch_size: int = 8,
    keep: bool = True,
    progress: bool = True,
    provider: BlockProvider | None = None,
    start: int = 0,
    hidden: Sequence[Tensor] | None = None,
    after_block: AfterBlock | None = None,
    offload_bytes: int | None = None,
    offload_dir: str | Path | None = None,
) -> dict[str, LayerStats]:
    """Collect input statistics ('act', 'hessian') of the selected linears, one decoder block at a time.

    data: token blocks [S, L], run in micro-batches of `batch_size`. layers: None (every linear inside
    the blocks), names, or a predicate. on_block(index, block, block_stats) is called after each block's
    statistics are collected and may modify the block; propagate picks whether the next block sees the
    outputs of the modified block ("quantized") or of the unmodified one ("original"). keep=False drops
    each block's statistics after on_block (returns {}), so only one block's Hessians are alive at a time.
    Under several processes (`lowbit.parallel`) each runs its share of the samples and the statistics
    are summed over the processes before on_block sees them.
    The model's training flag is restored.

    provider: materialises each block before its turn and releases it after (default: the model is
    whole). start, hidden: begin at block `start` with `hidden` (one [B, L, D] per micro-batch) as its
    inputs. after_block(index, hidden): called once block `index` is done, with the next block's inputs.

    offload_bytes: the hidden states between two blocks are kept in memory up to this many bytes, the
    rest in safetensors files in a temporary folder inside `offload_dir` (default: the system's temporary
    folder), removed at the end (`lowbit.calibration.hidden`); the results are the same bit for bit.
    None keeps them all in memory.
    """
    kinds = check_kinds(stats, ("act", "hessian"))
    if propagate not in PROPAGATE:
        raise CalibrationError(f"propagate must be one of {PROPAGATE}, got {propagate!r}")
    if batch_size < 1:
        raise CalibrationError(f"batch_size must be >= 1, got {batch_size}")
    data = check_tokens(model, data)
    w = world()
    data = rank_share(data, w)
    prefix, blocks = find_blocks(model)
    attn = block_kinds(model, len(blocks))
    selected = select_linears(model, layers)
    write = on_block is None or propagate == "original"
    was_training = model.training
    result: dict[str, LayerStats] = {}
    states = HiddenStates(offload_bytes, offload_dir)
    try:
        model.eval()
        with provider.on_demand() if provider is not None else contextlib.nullcontext():
            inputs = capture_block_inputs(model, blocks, attn, data, batch_size, states)
        for j in range(min(len(states), len(hidden or []))):  # one saved micro-batch in memory at a time
            dtype, _, device = states.layout[j]
            states[j] = hidden[j].to(device, dtype)
        for i in tqdm(range(start, len(blocks)), desc="calibrate", disable=not progress):
            if provider is not None:
                provider.materialise(i)
            names = {n for n, _ in blocks[i].named_modules(prefix=f"{prefix}.{i}" if prefix else str(i))}
            # taken out of `selected`: a layer that on_block replaces is freed with this block
            linears = {n: selected.pop(n) for n in list(selected) if n in names}
            block_stats = (
                _run_block(blocks[i], attn[i], inputs, states, linears, kinds, write)
                if linears or write
                else {}
            )
            reduce_stats(block_stats, w)  # every rank now holds the statistics of all samples
            if on_block is not None:
                on_block(i, blocks[i], block_stats)
                if propagate == "quantized":
                    _run_block(blocks[i], attn[i], inputs, states, {}, kinds, write=True)
            if after_block is not None:
                after_block(i, states)
            if provider is not None:
                provider.release(i)
            if keep:
                result.update(block_stats)
            del block_stats  # not alive while the next block's statistics are summed (peak memory)
    finally:
        states.close()
        model.train(was_training)
    return result


def _token_blocks(data, samples: int, seq_len: int, seed: int, tokenizer) -> tuple[Tensor, str]:
    """(token blocks [S, L], source name) from token blocks or any data `calibration_blocks` accepts."""
    if isinstance(data, Tensor):
        return data, "tensor"
    name = str(data) if isinstance(data, (str, Path)) else type(data).__name__
    try:
        return calibration_blocks(tokenizer, data, samples, seq_len, seed=seed), name
    except DataError as e:  # one error type out of calibrate
        raise CalibrationError(str(e)) from None


def calibrate(
    model: nn.Module,
    data=DEFAULT_SOURCE,
    samples: int = 128,
    seq_len: int = 512,
    stats: tuple[str, ...] = ("act", "hessian"),
    seed: int = 0,
    tokenizer=None,
    layers: LayerFilter = None,
    progress: bool = True,
    batch_size: int = 8,
) -> CalibrationStats:
    """Calibration statistics of a decoder-only transformer's linear layers; the model is left as it was.

    data: token blocks [S, L] (used as given), or any data `lowbit.calibration.data.calibration_blocks`
    accepts (a source string such as "builtin:lee-news" or a local file, a list of documents, a
    datasets.Dataset, tokenizer output), cut into `samples` blocks of `seq_len` tokens with `tokenizer`
    and `seed`.
    stats: any of "act" (max |x|, mean x^2) and "hessian" (X^T X), both collected block by block, and
    "fisher" (squared gradients, from full-model backward passes).
    layers: None (every linear inside the decoder blocks, not lm_head), names, or a predicate on names.
    """
    kinds = check_kinds(stats)
    tokens, source = _token_blocks(data, samples, seq_len, seed, tokenizer)
    tokens = check_tokens(model, tokens, min_len=2 if "fisher" in kinds else 1)
    names = list(select_linears(model, layers))
    result = {name: LayerStats() for name in names}
    sequential = tuple(k for k in kinds if k != "fisher")
    if sequential:
        result.update(
            calibrate_sequential(model, tokens, sequential, names, batch_size=batch_size, progress=progress)
        )
    if "fisher" in kinds:
        for name, F in fisher_diagonal(model, tokens, names, progress=progress).items():
            result[name].fisher, result[name].fisher_samples = F, tokens.shape[0]
    S, L = tokens.shape
    return CalibrationStats(result, samples=S, seq_len=L, tokens=S * L, source=source, seed=seed)
