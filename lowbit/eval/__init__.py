"""Evaluation: held-out perplexity of a lowbit checkpoint, an export or any model, with its stored size.

    r = evaluate("out/int4", "builtin:lee-news")      # {"perplexity", "tokens", "bits_per_weight", ...}

`evaluate` loads a lowbit checkpoint with `lowbit.load`, an export with its target's reader
(`lowbit.export.load_export`: what the serving engine computes) and anything else as a source model
(`lowbit.models.load_model`), and reports bits per weight as the files store them.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from lowbit.calibration.data import eval_tokens
from lowbit.eval.perplexity import EvalError, dense_bits_per_weight, perplexity
from lowbit.export import find_target, load_export, stored_bits_per_weight
from lowbit.models import load_model
from lowbit.nn.checkpoint import checkpoint_info, load, load_tokenizer, model_bits_per_weight
from lowbit.nn.manifest import is_checkpoint

__all__ = ["EvalError", "evaluate", "perplexity"]


def _load_target(target: str, device, dtype) -> tuple[nn.Module, object, float]:
    """(model on `device`, tokenizer, bits per weight as stored) of a checkpoint, an export or a source
    model; dtype None keeps a checkpoint's stored dtypes and loads anything else in float32."""
    if is_checkpoint(target):
        net, tokenizer = load(target, device=device or "cpu", dtype=dtype), load_tokenizer(target)
        if tokenizer is None:
            raise EvalError(f"checkpoint {target} has no tokenizer files; cannot tokenize evaluation text")
        return net, tokenizer, checkpoint_info(target)["totals"]["bits_per_weight"]
    if find_target(target) is not None:
        net, tokenizer, _ = load_export(target, dtype or torch.float32)
    else:
        net, tokenizer = load_model(target, dtype or torch.float32)
    bpw = stored_bits_per_weight(target, net)
    net = net if device is None else net.to(device)
    return net, tokenizer, dense_bits_per_weight(net) if bpw is None else bpw


def evaluate(
    target: str,
    data: str,
    tokens: int | None = None,
    seq_len: int = 512,
    batch_size: int = 4,
    progress: bool = True,
    model: nn.Module | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """Perplexity of `target` on the held-out part of `data`, on `device` (default the CPU); `model`,
    when given, is evaluated in place of the target's weights (the target still gives the tokenizer; bits
    are the model's QLinears')."""
    t0 = time.perf_counter()
    if model is None:
        net, tokenizer, bpw = _load_target(target, device, dtype)
    else:
        tokenizer = load_tokenizer(target) if is_checkpoint(target) else load_model(target)[1]
        net, bpw = model, model_bits_per_weight(model)
    ids = eval_tokens(tokenizer, data, max_tokens=tokens)
    r = perplexity(net, ids, seq_len=seq_len, batch_size=batch_size, progress=progress)
    if not math.isfinite(r["perplexity"]):  # a broken model must not pass as a measurement
        raise EvalError(f"perplexity of {target} is {r['perplexity']}: the model computes non-finite logits")
    return {
        "target": target,
        "data": data,
        "perplexity": r["perplexity"],
        "tokens": r["tokens"],
        "bits_per_weight": bpw,
        "seconds": round(time.perf_counter() - t0, 1),
    }
