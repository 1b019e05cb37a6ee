"""The diagonal empirical Fisher of a decoder-only transformer's linear layers, one decoder block at a time.

`fisher_diagonal` (LQ-LoRA, Guo et al. 2023: F = sum_s (dL_s/dW)^2) runs one whole-model backward pass per
sample, so every weight is in memory at once. Here the same chain rule runs block by block:

1. Forward: the blocks in order on the calibration samples (`calibrate_sequential`, micro-batches, no
   gradients), the hidden states entering block i saved to disk (`input-0000i.safetensors`, [S, L, D]).
2. Backward, blocks in reverse order: block i is read, its input statistics collected from its saved
   inputs as `calibrate_sequential` collects them, then for each sample s its forward is recomputed from
   the saved input h_i[s] with gradients and back-propagated from g_{i+1}[s] = dL_s/dh_{i+1} (for the last
   block, from the loss L_s itself through the final norm and lm_head: the model's forward with every
   block standing in by its output), giving (dL_s/dW)^2 for the block's weights and g_i[s] = dL_s/dh_i for
   the block below. `on_block(index, block, stats)` then sees the block's statistics with their Fisher.

So only one block's weights, one set of saved hidden states and one set of gradients [S, L, D] are in
memory at a time; the saved inputs are on disk. After block i is done its gradients are saved
(`grad-0000i.safetensors`) and those of block i + 1 removed, so a killed run resumes below the last block
it finished. The Fisher equals the whole-model one up to the float rounding of the batched forward (the
saved inputs come from micro-batches, the whole-model pass runs one sample at a time).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.calibration.sequential import (
    BlockInputs,
    BlockProvider,
    OnBlock,
    _run_block,
    block_kinds,
    calibrate_sequential,
    capture_block_inputs,
)
from lowbit.calibration.stats import (
    LayerStats,
    check_kinds,
    check_tokens,
    find_blocks,
    rank_share,
    reduce_stats,
    select_linears,
)
from lowbit.parallel import all_reduce, barrier, world

# fp32 logits of one chunk of token positions through the lm_head ([T, V]: 110 positions at a vocabulary
# of 151936), here and in the loss passes (`lowbit.compress.losses`)
HEAD_CHUNK_BYTES = 64 << 20


class _Output(nn.Module):
    """Stands in for a decoder block in the model's forward: returns the given block output (a tensor with
    its autograd graph), so that the forward computes only the final norm, lm_head and the loss. Other
    attributes (an attention kind the model's loop reads) come from the block it replaces."""

    def __init__(self, block: nn.Module, out: Tensor, as_tuple: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule
        object.__setattr__(self, "_out", (out,) if as_tuple else out)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args, **kwargs):
        return object.__getattribute__(self, "_out")


class _Rows(nn.Module):
    """Stands in for the lm_head `head` in the model's forward: applies it to the given flat positions of
    its input [B, L, D] only, returning [1, len(rows), V] (what follows in the forward, such as a logit
    scale or soft cap, then applies to those logits as it would to all of them)."""

    def __init__(self, head: nn.Module, rows: Tensor) -> None:
        super().__init__()
        self.head, self.rows = head, rows

    def forward(self, hidden: Tensor) -> Tensor:
        return self.head(hidden.flatten(0, 1)[self.rows])[None]


def head_logits(
    model: nn.Module,
    blocks: nn.ModuleList,
    hidden: Tensor,
    ids: Tensor,
    as_tuple: bool,
    rows: Tensor | None = None,
) -> Tensor:
    """The model's logits [B, L, V] on ids [B, L] given the last block's output hidden states [B, L, D]:
    its own forward with every block standing in by that output (as a 1-tuple when `as_tuple`, as the
    blocks return it), so that the final norm, lm_head and what follows compute exactly as in the whole
    model's forward. rows: only the logits of these flat positions of [B, L], as [1, len(rows), V] (the
    lm_head applied to those rows alone, so that the logits of every position never exist at once)."""
    saved = list(blocks)
    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head)
    parent, _, attr = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    try:
        for j, block in enumerate(saved):
            blocks[j] = _Output(block, hidden, as_tuple)
        if rows is not None:
            setattr(owner, attr, _Rows(head, rows))
        return model(input_ids=ids, use_cache=False).logits
    finally:
        setattr(owner, attr, head)
        for j, block in enumerate(saved):
            blocks[j] = block


def _head_backward(model: nn.Module, blocks: nn.ModuleList, raw, ids: Tensor) -> None:
    """Back-propagate L_s, the mean next-token cross-entropy of sample ids [1, L] given the last block's
    output `raw` (with its autograd graph), into that graph: dL_s/d out [1, L, D] is summed over chunks of
    `head_tokens(V)` positions (each chunk's logits [T, V] and their gradients alone in memory, never
    [L, V]), then sent back through the block once."""
    as_tuple = isinstance(raw, (tuple, list))
    out = raw[0] if as_tuple else raw
    leaf = out.detach().requires_grad_(True)  # [1, L, D]
    n = ids.shape[1] - 1  # positions with a next token
    labels = ids[0, 1:]
    step = head_tokens(model.get_output_embeddings().out_features)
    for s in range(0, n, step):
        rows = torch.arange(s, min(s + step, n), device=ids.device)
        logits = head_logits(model, blocks, leaf, ids, as_tuple, rows)[0].float()  # [T, V]
        (nn.functional.cross_entropy(logits, labels[s : s + step], reduction="sum") / n).backward()
    out.backward(leaf.grad)


def head_tokens(vocab: int) -> int:
    """Token positions per lm_head chunk: fp32 logits [T, V] of at most HEAD_CHUNK_BYTES."""
    return max(1, HEAD_CHUNK_BYTES // (4 * vocab))


def _save(path: Path, t: Tensor) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({"t": t.detach().contiguous().cpu()}, str(tmp))
    tmp.replace(path)


def _load(path: Path) -> Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("t")


@contextlib.contextmanager
def _grads_only(model: nn.Module, weights: list[nn.Parameter]):
    """Gradients for `weights` only; every parameter's requires_grad and grad restored on exit."""
    params = list(model.parameters())
    flags = [(p, p.requires_grad, p.grad) for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        yield
    finally:
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad


def calibrate_backward(
    model: nn.Module,
    data: Tensor,
    directory: str | Path,
    layers=None,
    stats: tuple[str, ...] = ("act", "hessian"),
    on_block: OnBlock | None = None,
    before_block: OnBlock | None = None,
    batch_size: int = 8,
    progress: bool = True,
    provider: BlockProvider | None = None,
) -> None:
    """Statistics ('act', 'hessian') and the diagonal Fisher of the selected linears inside the decoder
    blocks, one block at a time, blocks in reverse order (module docstring); on_block(index, block,
    stats) sees each block's {name: LayerStats} with `fisher` set (fp32 [N, K]).

    data: token blocks [S, L] (L >= 2). directory: where the saved inputs and gradients go (they are left
    there; the caller removes the folder). before_block(index, block, block_stats): called in the forward
    pass with the block's statistics (from `calibrate_sequential`) and may modify the block (activation
    scaling); the next block then sees the modified block's outputs. Under several processes each runs
    its share of the samples; statistics and Fisher are summed over the processes.
    """
    kinds = check_kinds(stats, ("act", "hessian"))
    data = check_tokens(model, data, min_len=2)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    w = world()
    tag = f"-rank{w.rank}" if w.size > 1 else ""
    prefix, blocks = find_blocks(model)
    n = len(blocks)
    selected = select_linears(model, layers)

    def saved(kind: str, index: int) -> Path:
        return directory / f"{kind}-{index:05d}{tag}.safetensors"

    # resume below the lowest block whose gradients a killed run saved (every rank saved its own)
    done = next((i for i in range(n) if saved("grad", i).is_file()), n)
    done = int(all_reduce(torch.tensor([done]), "max", w).item())

    def keep_input(index: int, hidden: Sequence[Tensor]) -> None:
        if index + 1 < done:
            _save(saved("input", index + 1), torch.cat(list(hidden)))

    if done > 0:
        calibrate_sequential(
            model,
            data,
            ("act",) if before_block is None else kinds,
            selected,
            before_block,
            keep=False,
            progress=progress,
            provider=provider,
            after_block=keep_input,
            batch_size=batch_size,
        )
    mine = rank_share(data, w)
    attn = block_kinds(model, n)
    was_training = model.training
    model.eval()
    try:
        with provider.on_demand() if provider is not None else contextlib.nullcontext():
            batched = capture_block_inputs(model, blocks, attn, mine, batch_size)
            single = capture_block_inputs(model, blocks, attn, mine, 1)
        first = torch.cat([b.hidden for b in batched])  # [S, L, D]: the inputs of block 0
        grad = _load(saved("grad", done)) if done < n else None
        for i in tqdm(range(done - 1, -1, -1), desc="fisher", disable=not progress):
            inputs = first if i == 0 else _load(saved("input", i))
            if provider is not None:
                provider.materialise(i)
                if i == n - 1:
                    provider.materialise(None)  # the final norm and lm_head
            names = {m for m, _ in blocks[i].named_modules(prefix=f"{prefix}.{i}" if prefix else str(i))}
            linears = {name: m for name, m in selected.items() if name in names}
            for b, start in zip(batched, range(0, inputs.shape[0], batch_size), strict=True):
                b.hidden = inputs[start : start + batch_size].to(b.hidden.device, b.hidden.dtype)
            hidden = [b.hidden for b in batched]
            block_stats = _run_block(blocks[i], attn[i], batched, hidden, linears, kinds, write=False)
            reduce_stats(block_stats, w)
            grad = _block_fisher(model, blocks, i, attn[i], single, inputs, grad, mine, linears, block_stats)
            if on_block is not None:
                on_block(i, blocks[i], block_stats)
            _save(saved("grad", i), grad)
            barrier(w)  # every process holds block i's gradients before any removes those of i + 1
            if i + 1 < n:
                saved("grad", i + 1).unlink(missing_ok=True)
            saved("input", i).unlink(missing_ok=True)
            if provider is not None:
                provider.release(i)
                if i == n - 1:
                    provider.release(None)
    finally:
        model.train(was_training)


def _block_fisher(
    model: nn.Module,
    blocks: nn.ModuleList,
    index: int,
    kind: str,
    single: list[BlockInputs],
    inputs: Tensor,
    grad: Tensor | None,
    tokens: Tensor,
    linears: dict[str, nn.Module],
    block_stats: dict[str, LayerStats],
) -> Tensor:
    """Sum over this process's samples of (dL_s/dW)^2 for the block's `linears`, summed over the processes
    into block_stats[name].fisher; returns dL_s/dh_index for every sample ([S, L, D], inputs' dtype).

    inputs: h_index [S, L, D] (the block's saved inputs); grad: dL_s/dh_{index+1} [S, L, D], None for the
    last block (the loss is then computed from the block's output); single: one-sample block contexts."""
    block = blocks[index]
    F = {
        name: torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device)
        for name, m in linears.items()
    }
    out_grad = torch.empty_like(inputs)
    with _grads_only(model, [m.weight for m in linears.values()]), torch.enable_grad():
        for s, ctx in enumerate(single):
            h = inputs[s : s + 1].to(ctx.hidden.device, ctx.hidden.dtype).requires_grad_(True)
            one = BlockInputs(h, ctx.context, ctx.by_name)
            args, kwargs = one.context[kind]
            raw = block(*args, hidden_states=h, **kwargs) if one.by_name else block(h, *args, **kwargs)
            if grad is None:
                ids = tokens[s : s + 1].to(h.device)
                _head_backward(model, blocks, raw, ids)
            else:
                out = raw[0] if isinstance(raw, (tuple, list)) else raw
                out.backward(grad[s : s + 1].to(out.device, out.dtype))
            for name, m in linears.items():
                F[name].add_(m.weight.grad.float().square())
                m.weight.grad = None
            out_grad[s : s + 1] = h.grad.to(out_grad.dtype)
    w = world()
    for name in sorted(F):  # the same order on every rank
        all_reduce(F[name], "sum", w)
    samples = int(all_reduce(torch.tensor([len(single)]), "sum", w).item())
    for name, st in block_stats.items():
        if name in F:
            st.fisher, st.fisher_samples = F[name], samples
    return out_grad
