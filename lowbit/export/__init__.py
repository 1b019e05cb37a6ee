"""Deployable exports of a lowbit checkpoint: `lowbit export DIR --to TARGET --out OUT`.

TARGETS, the registry (one `Target` each, `lowbit.export.target`):

- `compressed-tensors` (vLLM, SGLang): the quantized base in the compressed-tensors layout plus the
  low-rank branch as a PEFT LoRA adapter in `adapter/` (`lowbit.export.compressed_tensors`).
- `gguf` (llama.cpp): `model.gguf` with Q8_0 / Q4_0 / Q4_1 blocks and the tokenizer, plus the low-rank
  branch as a GGUF LoRA adapter `adapter.gguf` (`lowbit.export.gguf`).
- `dense`: a plain transformers checkpoint of W = (dequantize(Q) + L1 L2) / smooth in fp16 / bf16 / fp32
  (`lowbit.export.dense`).

Targets that hold some specs only, and no smoothing, go through `lowbit.export.fit`: smoothing folded
into norms, and the layers the target cannot hold refused or, with `convert=True`, re-quantized, each
layer's relative weight error reported. The output folder appears atomically (`lowbit.nn.atomic`) with
`lowbit_export.json`, the export report, beside the target's files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.export.compressed_tensors import CT
from lowbit.export.dense import DENSE, densify
from lowbit.export.fit import fit_to_target, probe_ids
from lowbit.export.gguf import EMBEDDING_TYPES, GGUF
from lowbit.export.target import ExportError, Target
from lowbit.nn.atomic import atomic_folder, check_output
from lowbit.nn.checkpoint import load, load_tokenizer
from lowbit.nn.manifest import read_manifest

TARGETS: dict[str, Target] = {"compressed-tensors": CT, "gguf": GGUF, "dense": DENSE}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MARKER = "lowbit_export.json"

__all__ = [
    "DTYPES",
    "EMBEDDING_TYPES",
    "TARGETS",
    "ExportError",
    "Target",
    "export",
    "find_target",
    "load_export",
]


@torch.no_grad()
def _fit(model: nn.Module, target: Target, convert: bool, dtype: torch.dtype) -> tuple[dict, float]:
    """Fit `model` to `target` in place; return (per-layer report, largest logit change on probe ids)."""
    if target.check_model is not None:  # before any conversion work
        target.check_model(model.config)
    ids = probe_ids(model)
    before = model(ids).logits.float()
    if target.problem is None:
        layers = densify(model, dtype)
    else:
        layers = fit_to_target(model, target, convert, dtype)
    diff = float((model(ids).logits.float() - before).abs().max())
    if target.problem is not None and not any("converted" in e for e in layers.values()):
        if diff > 1e-4 * float(before.abs().max()):
            raise ExportError(f"folding the smoothing into the norms changed the logits by {diff:.3g}")
    return layers, diff


def export(
    checkpoint: str | Path,
    out: str | Path,
    target: str,
    *,
    convert: bool = False,
    dtype: str | None = None,
    overwrite: bool = False,
    embedding: str | None = None,
) -> dict:
    """Export the lowbit checkpoint folder `checkpoint` as `target` into `out`; return the report.

    dtype: "float16" | "bfloat16" | "float32" of every floating tensor written (scales and low-rank
    factors too); default the dtype of the checkpoint's unquantized tensors. The report holds per-layer
    entries and `logits_max_abs_diff`, the largest logit change against the checkpoint on 32 probe tokens
    of the exported weights (dense: as written, run in float32; compressed-tensors and GGUF: after
    folding and conversion, before the cast to `dtype` and, for GGUF, to fp16 block scales).
    GGUF needs a Llama model, `dtype` float32 / float16 / bfloat16 and the checkpoint's tokenizer.
    embedding: GGUF only, the token embedding's type (`lowbit.export.gguf.EMBEDDING_TYPES`; default "auto":
    Q6_K or Q8_0 as llama-quantize chooses).
    """
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    options = {} if embedding is None else {"embedding": embedding}
    t = TARGETS[target]
    for option in options:
        if option not in t.options:
            takers = ", ".join(n for n, x in TARGETS.items() if option in x.options)
            raise ExportError(f"the {option} option applies to {takers} exports only")
    if embedding is not None and embedding not in EMBEDDING_TYPES:
        raise ExportError(f"unknown embedding type {embedding!r}; choose one of {', '.join(EMBEDDING_TYPES)}")
    checkpoint, out = Path(checkpoint), check_output(out, overwrite)
    read_manifest(checkpoint)
    model, tokenizer = load(checkpoint, backend="reference"), load_tokenizer(checkpoint)
    torch_dtype = DTYPES[dtype] if dtype else model.get_input_embeddings().weight.dtype
    layers, diff = _fit(model, t, convert, torch_dtype)
    report = {
        "checkpoint": str(checkpoint),
        "out": str(out),
        "target": target,
        "dtype": str(torch_dtype).removeprefix("torch."),
        **options,
        "adapter": None,
        "converted": sum("converted" in e for e in layers.values()),
        "logits_max_abs_diff": diff,
        "layers": layers,
    }
    with atomic_folder(out, overwrite) as tmp:
        t.write(model, tmp, torch_dtype, tokenizer, checkpoint.resolve().name, **options)
        adapter = next((p for p in ("adapter", "adapter.gguf") if (tmp / p).exists()), None)
        report["adapter"] = None if adapter is None else str(out / adapter)
        (tmp / MARKER).write_text(json.dumps(report, indent=2) + "\n")
    return report


def find_target(path: str | Path) -> str | None:
    """The name of the target whose output `path` is (its export marker first, else the layout), or None."""
    path = Path(path).expanduser()
    try:
        name = json.loads((path / MARKER).read_text()).get("target")
    except (OSError, ValueError, AttributeError):
        name = None
    if name in TARGETS:
        return name
    return next((n for n, t in TARGETS.items() if t.detect(path)), None)


def load_export(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object, str]:
    """(model, tokenizer, target name) of an export folder (or .gguf file), as its engine computes it."""
    name = find_target(path)
    if name is None:
        raise ExportError(f"{path} is not an export lowbit can read ({', '.join(TARGETS)})")
    net, tokenizer = TARGETS[name].reload(Path(path).expanduser(), dtype)
    return net, tokenizer, name


def stored_bits_per_weight(path: str | Path, net: nn.Module) -> float | None:
    """Bits per weight of an export (or any transformers folder / GGUF file) as its files store them."""
    name = find_target(path)
    return None if name is None else TARGETS[name].stored_bits(Path(path).expanduser(), net)
