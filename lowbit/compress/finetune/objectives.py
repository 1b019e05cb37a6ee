"""The training objectives (lm, distill) and the token blocks they are computed on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.calibration.data import calibration_blocks
from lowbit.compress.finetune.config import FinetuneConfig, FinetuneError
from lowbit.parallel import broadcast_tensors, world


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def objective_loss(
    model: nn.Module, teacher: nn.Module | None, x: torch.Tensor, objective: str, hidden_weight: float = 0.0
) -> torch.Tensor:
    """Mean loss of `model` on token blocks x [B, L]: next-token CE (lm) or KL(teacher || student)."""
    hidden = objective == "distill" and hidden_weight > 0
    out = model(input_ids=x, use_cache=False, output_hidden_states=hidden)
    logits = out.logits.float()  # [B, L, V]
    V = logits.shape[-1]
    if objective == "lm":
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    with torch.no_grad():
        t = teacher(input_ids=x, use_cache=False, output_hidden_states=hidden)
    if t.logits.shape[-1] != V:
        raise FinetuneError(f"teacher has {t.logits.shape[-1]} logits per token, the model {V}")
    log_p = F.log_softmax(t.logits.float().reshape(-1, V), dim=-1)  # teacher, [B * L, V]
    log_q = F.log_softmax(logits.reshape(-1, V), dim=-1)
    loss = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")  # per token
    if hidden:
        pairs = list(zip(out.hidden_states[1:], t.hidden_states[1:], strict=True))
        loss = loss + hidden_weight * sum(F.mse_loss(h.float(), g.float()) for h, g in pairs) / len(pairs)
    return loss


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Blocks of `step`: the step-th slice of a stream of per-epoch random permutations of range(n).

    A pure function of its arguments, so a resumed run draws the same batches.
    """
    start = step * batch_size
    out, perms = [], {}
    for i in range(start, start + batch_size):
        epoch, pos = divmod(i, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(perms[epoch][pos])
    return torch.stack(out)


@torch.no_grad()
def sample_blocks(teacher: nn.Module, n: int, seq_len: int, bos_id: int, seed: int = 0) -> torch.Tensor:
    """n blocks of seq_len tokens sampled from the teacher (temperature 1), each starting at bos_id."""
    g = torch.Generator().manual_seed(seed)
    device, blocks = _device(teacher), []
    teacher.eval()
    for i in range(0, n, 8):
        tokens = [torch.full((min(8, n - i), 1), bos_id, dtype=torch.long)]
        past = None
        for _ in range(seq_len - 1):
            out = teacher(input_ids=tokens[-1].to(device), past_key_values=past, use_cache=True)
            past = out.past_key_values
            probs = torch.softmax(out.logits[:, -1].float(), dim=-1).cpu()  # [b, V]
            tokens.append(torch.multinomial(probs, 1, generator=g))
        blocks.append(torch.cat(tokens, dim=1))
    return torch.cat(blocks)


def training_blocks(config: FinetuneConfig, blocks, tokenizer, teacher) -> torch.Tensor:
    """Token blocks [S, L] to train and evaluate on: from config.data when set, else `blocks`. Text
    sampled from the teacher is sampled by rank 0 and sent to the other processes, so that every rank
    trains on the same blocks."""
    if config.data == "teacher":
        if teacher is None:
            raise FinetuneError("data 'teacher' samples text from the teacher, but no teacher was given")
        bos = getattr(tokenizer, "bos_token_id", None)
        bos = getattr(teacher.config, "bos_token_id", None) if bos is None else bos
        if bos is None:
            raise FinetuneError("cannot sample from the teacher: no BOS token id in tokenizer or config")
        w = world()
        sampled = None
        if w.main:
            sampled = {"blocks": sample_blocks(teacher, config.samples, config.seq_len, bos, config.seed)}
        blocks = broadcast_tensors(sampled, {}, 0, w)[0]["blocks"]
    elif config.data is not None:
        if tokenizer is None:
            raise FinetuneError(f"finetune data {config.data!r} needs a tokenizer")
        blocks = calibration_blocks(tokenizer, config.data, config.samples, config.seq_len, seed=config.seed)
    elif blocks is None:
        raise FinetuneError("no training data: pass token blocks (e.g. the calibration blocks) or set data")
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.is_floating_point():
        raise FinetuneError("token blocks must be an integer tensor [blocks, tokens]")
    if blocks.shape[1] < 2 or blocks.shape[0] <= config.eval_blocks:
        raise FinetuneError(
            f"need more than eval_blocks={config.eval_blocks} blocks of >= 2 tokens, "
            f"got {tuple(blocks.shape)}"
        )
    return blocks[:, : config.seq_len].long()
