"""The dense export: a plain transformers checkpoint of W = (dequantize(Q) + L1 L2) / smooth (times R^T
for a layer with an online Hadamard transform x -> x R: `lowbit.export.fit.effective_weight`).

Every QLinear becomes an `nn.Linear` holding the weight it computes, in the export dtype (fp16, bf16 or
fp32); anything reads it. The per-layer report gives the relative error of that cast.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.export.files import dense_state, safetensors_bits, write_model
from lowbit.export.fit import effective_weight
from lowbit.export.target import Target
from lowbit.models.source import from_pretrained
from lowbit.nn.qlinear import QLinear, set_submodule


@torch.no_grad()
def densify(model: nn.Module, dtype: torch.dtype) -> dict[str, dict]:
    """Replace every QLinear by an nn.Linear of its effective weight in `dtype`, in place; the rest of
    the model goes through `dtype` too (and back to float32, so it runs what is written). Returns the
    per-layer report."""
    report = {}
    for n, m in [(n, m) for n, m in model.named_modules() if isinstance(m, QLinear)]:
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype)
        W = effective_weight(m)
        lin.weight.data = W.to(dtype)
        if m.bias is not None:
            lin.bias.data = m.bias.detach().to(dtype)
        set_submodule(model, n, lin)
        err = float((W.to(dtype).float() - W).norm() / W.norm().clamp_min(1e-30))
        report[n] = {"source": m.spec.short(), "rank": m.rank, "target": "dense", "rel_error": err}
    model.to(dtype).float()
    return report


def write_dense(model: nn.Module, tmp: Path, dtype: torch.dtype, tokenizer, name: str) -> None:
    """Write the densified model (and its tokenizer) as a transformers checkpoint in `tmp`."""
    write_model(tmp, dense_state(model, dtype, set()), model.config, dtype, None)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def is_dense(path: Path) -> bool:
    """Whether `path` is a transformers folder without a quantization config."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "quantization_config" not in config


DENSE = Target(
    "dense",
    write=write_dense,
    detect=is_dense,
    reload=lambda path, dtype: from_pretrained(str(path), str(path), dtype),
    stored_bits=safetensors_bits,
)
