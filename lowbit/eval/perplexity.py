"""Perplexity on held-out tokens, and the storage cost of a dense model for comparison.

Perplexity is exp of the mean next-token negative log-likelihood,

    PPL = exp( -1/N * sum_w sum_{t=1}^{|w|-1} log p(x_{w,t} | x_{w,<t}) ),

over non-overlapping windows w of `seq_len` tokens, each evaluated from an empty context (the usual
GPTQ / AWQ evaluation). The last, shorter window is kept when it has at least 2 tokens and dropped when it
has one, so N = T - n_windows for n_windows kept windows (T - 1 - n_windows when one token is dropped).
Log-probabilities are computed in fp32 whatever the model's dtype, and summed in fp64.
Full windows are batched; the shorter last window runs alone.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


class EvalError(ValueError):
    """Evaluation input that cannot be used: too few tokens, bad window or batch size."""


def windows(T: int, seq_len: int) -> list[tuple[int, int]]:
    """(start, end) of the non-overlapping windows over T tokens; a last window shorter than 2 is dropped."""
    return [(a, min(a + seq_len, T)) for a in range(0, T, seq_len) if min(a + seq_len, T) - a >= 2]


def perplexity(
    model: nn.Module, tokens: torch.Tensor, seq_len: int = 512, batch_size: int = 4, progress: bool = True
) -> dict:
    """Perplexity of `model` on `tokens` (LongTensor [T]): {"perplexity": float, "tokens": predicted count}.

    `model(input_ids, use_cache=False)` must return an object with `.logits` [B, L, V]. The model is put
    in eval mode for the call and its previous mode restored. The progress bar shows only on a terminal.
    """
    if seq_len < 2 or batch_size < 1:
        raise EvalError(
            f"seq_len must be >= 2 and batch_size >= 1, got seq_len={seq_len}, batch={batch_size}"
        )
    tokens = torch.as_tensor(tokens).reshape(-1).long()
    spans = windows(tokens.numel(), seq_len)
    if not spans:
        raise EvalError(f"perplexity needs at least 2 tokens, got {tokens.numel()}")
    full = [s for s in spans if s[1] - s[0] == seq_len]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[s] for s in spans if s[1] - s[0] < seq_len]
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    bar = tqdm(total=len(spans), desc="perplexity", unit="window", disable=None if progress else True)
    try:
        with torch.inference_mode():
            for batch in batches:
                # x: [B, L]
                x = torch.stack([tokens[a:b] for a, b in batch]).to(device)
                nll += _window_nll(model, x)
                count += x.numel() - x.shape[0]
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return {"perplexity": math.exp(nll / count), "tokens": count}


def _window_nll(model: nn.Module, x: torch.Tensor) -> float:
    """Sum over the batch of next-token NLL; x: [B, L] -> predicts x[:, 1:] from logits[:, :-1].

    One window at a time: its logits[b, :-1] are a view of the batch's (no copy of [B, L, V]), and the
    log-softmax inside the loss is one window's [L - 1, V] (Llama-3's vocabulary: 0.26 GB in fp32 at
    L = 512, where the whole batch's was four times that, twice over)."""
    logits = model(x, use_cache=False).logits  # [B, L, V]
    total = 0.0
    for b in range(x.shape[0]):
        nll = F.cross_entropy(logits[b, :-1].float(), x[b, 1:], reduction="none")  # [L - 1]
        total += nll.double().sum().item()
    return total


def dense_bits_per_weight(model: nn.Module) -> float:
    """Storage bits per weight of a dense model's linear layers (32 for fp32, 16 for fp16/bf16)."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    if not weights:
        raise EvalError("model has no linear layers")
    total = sum(w.numel() for w in weights)
    return sum(w.numel() * w.element_size() * 8 for w in weights) / total
