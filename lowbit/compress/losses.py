"""The mean next-token loss on calibration token blocks of variants of one model, each differing from the
float model in some of its layers: the numbers `allocate.probes`, `allocate.penalties` and
`allocate.check` compare (`lowbit.compress.probes`).

A `Variant` differs from the float model from decoder block `start` on (start = the number of blocks: the
float model itself); swap(index) is a context manager that puts its layers of block `index` (None: the
layers outside the blocks, a selected lm_head) in place for its body and the float ones back after.

`in_memory_losses`: the model is whole; each variant's layers are swapped in everywhere and the model's
forward runs on micro-batches of 4 token blocks (`calibration_loss`).

`streamed_losses`: one decoder block in memory at a time, through a block provider
(`lowbit.compress.blocks`). The inputs of block 0 are captured once, in the same micro-batches; the
hidden states of the float model are carried through the blocks while a variant still starts later,
and each variant's own hidden states begin as a copy of the float ones at its first differing block.
Each block is read once and run for every live variant with that variant's layers swapped in; then the
final norm and lm_head (the model's own forward, each block standing in by its output:
`lowbit.calibration.backward.head_logits`) give each variant's loss. Every block computes what the
whole model's forward computes on the same micro-batch, so the losses equal `in_memory_losses`' bit for
bit (tests/compress/test_losses_stream.py). The live variants' hidden states share `offload_bytes` of
memory, the rest on disk (`lowbit.calibration.hidden`). Under several processes each variant is run by
one owner rank (balanced by the blocks it runs) and the losses are summed over the ranks (each is
non-zero on one rank only, so the sum is exact).

Both take each micro-batch's loss from the last block's output through `head_loss`: the model's final
norm, lm_head and what follows run on a chunk of token positions at a time (fp32 logits [T, V] of at
most `lowbit.calibration.backward.HEAD_CHUNK_BYTES`), so the logits of a micro-batch ([4, L, V]: 0.62 GB
at L = 256 and Qwen2.5's vocabulary of 151936) never exist at once.

`cached` keeps each measured loss in the work area, so that a resumed job measures nothing twice (nor
a second budget a plan the first one measured).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lowbit.calibration.backward import head_logits, head_tokens
from lowbit.calibration.hidden import HiddenStates
from lowbit.calibration.sequential import _run_block, block_kinds, capture_block_inputs
from lowbit.calibration.stats import find_blocks
from lowbit.compress.workarea import WorkArea
from lowbit.nn.qlinear import set_submodule
from lowbit.parallel import all_reduce, barrier, owners, world

BATCH = 4  # token blocks per forward: calibration_loss's micro-batch, which the streamed runner keeps


def _unchanged(index: int | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Variant:
    """A model that differs from the float one from decoder block `start` on (module docstring)."""

    start: int
    swap: Callable[[int | None], contextlib.AbstractContextManager] = field(default=_unchanged)


Runner = Callable[[Tensor, dict[str, Variant]], dict[str, float]]


def block_layers(names, prefix: str, index: int | None) -> list[str]:
    """The names among `names` inside decoder block `index` (None: outside every block)."""
    if index is None:
        return [n for n in names if not n.startswith(prefix + ".")]
    return [n for n in names if n.startswith(f"{prefix}.{index}.")]


@contextlib.contextmanager
def replaced_weights(linears: dict[str, nn.Linear], weight_of: Callable[[str, Tensor], Tensor]):
    """Each layer's weight W replaced by weight_of(name, W) for the body, then put back."""
    W0 = {name: lin.weight.data for name, lin in linears.items()}
    try:
        for name, W in W0.items():
            linears[name].weight.data = weight_of(name, W)
        yield
    finally:
        for name, W in W0.items():
            linears[name].weight.data = W


@contextlib.contextmanager
def replaced_modules(model: nn.Module, modules: dict[str, nn.Module]):
    """The modules swapped in by name for the body; those there before are put back."""
    before = {name: model.get_submodule(name) for name in modules}
    try:
        for name, m in modules.items():
            set_submodule(model, name, m)
        yield
    finally:
        for name, m in before.items():
            set_submodule(model, name, m)


@torch.no_grad()
def calibration_loss(model: nn.Module, blocks: Tensor, batch_size: int = BATCH) -> float:
    """Mean next-token cross-entropy of `model` on token blocks [S, L]: each micro-batch's forward runs
    through its decoder blocks, then `head_loss` takes the last block's output (the same arithmetic as
    `streamed_losses`)."""
    device = model.get_input_embeddings().weight.device
    decoder = find_blocks(model)[1]
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        ids = blocks[i : i + batch_size].to(device)  # [B, L]
        out = last_block_output(model, decoder, ids)
        as_tuple = isinstance(out, (tuple, list))
        loss, n = head_loss(model, decoder, out[0] if as_tuple else out, ids, as_tuple)
        total += loss
        count += n
    return total / count


class _Stop(Exception):
    """Raised by a hook on the last decoder block to end the model's forward with that block's output."""


def last_block_output(model: nn.Module, blocks: nn.ModuleList, ids: Tensor):
    """The output of the last decoder block (as the block returns it) in the model's forward on ids
    [B, L]; the final norm and lm_head are not run."""

    def stop(module, args, out):
        raise _Stop(out)

    hook = blocks[-1].register_forward_hook(stop)
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop as done:
        return done.args[0]
    finally:
        hook.remove()
    raise RuntimeError("the model's forward did not run its last decoder block")


def head_loss(model: nn.Module, blocks, hidden: Tensor, ids: Tensor, as_tuple: bool) -> tuple[float, int]:
    """(sum, count) of the next-token cross-entropy on ids [B, L] given the last block's output hidden
    [B, L, D], through the model's own final norm, lm_head and what follows (`head_logits`), the lm_head
    applied to `head_tokens(V)` positions at a time: fp32 logits [T, V] of one chunk exist at once, never
    [B, L, V]. Each chunk's sum is added in float64 (in order), so the result depends on the chunk size
    only through that summation order (tests/compress/test_losses.py bounds the difference)."""
    B, L = ids.shape
    positions = (torch.arange(B)[:, None] * L + torch.arange(L - 1)).flatten()  # every [b, t < L-1]
    labels = ids[:, 1:].flatten()  # [B (L-1)]
    step = head_tokens(model.get_output_embeddings().out_features)  # a QLinear lm_head has it too
    total = 0.0
    for s in range(0, labels.numel(), step):
        rows = positions[s : s + step].to(ids.device)
        logits = head_logits(model, blocks, hidden, ids, as_tuple, rows)[0].float()  # [T, V]
        total += float(nn.functional.cross_entropy(logits, labels[s : s + step], reduction="sum"))
    return total, labels.numel()


def in_memory_losses(model: nn.Module, tokens: Tensor, variants: dict[str, Variant]) -> dict[str, float]:
    """{key: calibration_loss} of each variant of a model in memory on token blocks [S, L]."""
    n = len(find_blocks(model)[1])
    out = {}
    for key, v in variants.items():
        with contextlib.ExitStack() as stack:
            for index in [*range(v.start, n), None]:
                stack.enter_context(v.swap(index))
            out[key] = calibration_loss(model, tokens)
    return out


@torch.no_grad()
def streamed_losses(
    model: nn.Module,
    provider,
    tokens: Tensor,
    variants: dict[str, Variant],
    offload_bytes: int | None = None,
    offload_dir=None,
) -> dict[str, float]:
    """{key: calibration loss} of each variant on token blocks [S, L], one block materialised at a time
    (module docstring); equal to in_memory_losses' bit for bit."""
    prefix, blocks = find_blocks(model)
    n = len(blocks)
    attn = block_kinds(model, n)
    w = world()
    own = owners({k: float(n + 1 - v.start) for k, v in variants.items()}, w.size)
    mine = {k: v for k, v in variants.items() if own[k] == w.rank}
    limit = None if offload_bytes is None else offload_bytes // (len(mine) + 1)
    tuples = []  # whether the blocks return a tuple, as the head's stand-ins must

    def record(module, args, out) -> None:
        tuples.append(isinstance(out, (tuple, list)))

    hooks = [b.register_forward_hook(record) for b in blocks]
    states: dict[str, HiddenStates] = {}
    floats = HiddenStates(limit, offload_dir)
    was_training = model.training
    model.eval()
    try:
        with provider.on_demand():
            inputs = capture_block_inputs(model, blocks, attn, tokens, BATCH, floats)
        for i in range(n + 1):
            for k, v in mine.items():
                if v.start == i:  # its hidden states are the float model's up to here
                    states[k] = HiddenStates(limit, offload_dir)
                    for j in range(len(floats)):
                        states[k].append(floats[j])
            if i == n:
                break
            carry = any(v.start > i for v in mine.values())
            if not carry and len(floats):  # no variant reads the float hidden states any more
                floats.close()
                floats = HiddenStates(limit, offload_dir)
            provider.materialise(i)
            if carry:
                _run_block(blocks[i], attn[i], inputs, floats, {}, (), write=True)
            for k, hidden in states.items():
                with mine[k].swap(i):
                    _run_block(blocks[i], attn[i], inputs, hidden, {}, (), write=True)
            provider.release(i)
        losses = torch.zeros(len(variants), dtype=torch.float64)
        provider.materialise(None)
        try:
            for idx, k in enumerate(variants):
                if k in states:
                    with mine[k].swap(None):
                        as_tuple = bool(tuples and tuples[-1])
                        losses[idx] = _head_loss(model, blocks, states[k], tokens, as_tuple)
        finally:
            provider.release(None)
    finally:
        for h in hooks:
            h.remove()
        floats.close()
        for hidden in states.values():
            hidden.close()
        model.train(was_training)
    all_reduce(losses, "sum", w)
    return {k: float(losses[idx]) for idx, k in enumerate(variants)}


def _head_loss(model, blocks, hidden: HiddenStates, tokens: Tensor, as_tuple: bool) -> float:
    """calibration_loss's arithmetic over the micro-batches, from the last block's outputs `hidden`."""
    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    for j, start in enumerate(range(0, tokens.shape[0], BATCH)):
        ids = tokens[start : start + BATCH].to(device)  # [B, L]
        loss, n = head_loss(model, blocks, hidden[j], ids, as_tuple)
        total += loss
        count += n
    return total / count


def cached(run: Runner, work: WorkArea) -> Runner:
    """`run`, each loss saved in the work area under its key and the token blocks' shape, and read back
    instead of measured again (a resumed job)."""

    def saved_run(tokens: Tensor, variants: dict[str, Variant]) -> dict[str, float]:
        name = f"losses/{tokens.shape[0]}x{tokens.shape[1]}-{{}}.safetensors".format
        found = {k: work.load(name(k)) for k in variants}
        unmeasured = {k: v for k, v in variants.items() if found[k] is None}
        got = run(tokens, unmeasured) if unmeasured else {}
        if world().main:
            for k, loss in got.items():
                work.save(name(k), {}, {"loss": loss})
        barrier(world())  # every process sees the same saved losses at its next call
        return {k: got[k] if k in got else float(found[k][1]["loss"]) for k in variants}

    return saved_run
