"""Deployable exports of a lowbit checkpoint: `lowbit export DIR --to TARGET --out OUT`.

- `compressed-tensors` (vLLM, SGLang): the quantized base in the compressed-tensors layout plus the
  low-rank branch as a PEFT LoRA adapter in `adapter/` (`lowbit.compress.ct_export`).
- `gguf` (llama.cpp): `model.gguf` with Q8_0 / Q4_0 / Q4_1 blocks and the tokenizer, plus the low-rank
  branch as a GGUF LoRA adapter `adapter.gguf` (`lowbit.compress.gguf_export`).
- `dense`: a plain transformers checkpoint of W = (dequantize(Q) + L1 L2) / smooth in fp16 / bf16 / fp32.

compressed-tensors and GGUF hold some specs only, and no smoothing: `lowbit.compress.prepare` folds
smoothing into norms and refuses the layers the format cannot hold, or with `convert=True` re-quantizes
them, each layer's relative weight error reported. Everything is written into a hidden sibling folder and
renamed into place, like `checkpoint.save`.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
from pathlib import Path

import torch
from torch import nn

from lowbit.compress.checkpoint import load, load_tokenizer, move_into_place
from lowbit.compress.ct_export import ADAPTER_DIR, CT, write_ct
from lowbit.compress.gguf_export import ADAPTER_FILE, GGUF, check_llama, write_gguf
from lowbit.compress.manifest import read_manifest
from lowbit.compress.prepare import (
    ExportError,
    dense_state,
    effective_weight,
    prepare,
    probe_ids,
    write_model,
)
from lowbit.compress.qlinear import QLinear, set_submodule

TARGETS = ("compressed-tensors", "gguf", "dense")
FORMATS = {"compressed-tensors": CT, "gguf": GGUF}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@torch.no_grad()
def _write_dense(model: nn.Module, tmp: Path, dtype: torch.dtype) -> dict[str, dict]:
    """Replace every QLinear by an nn.Linear of W = (dequantize(Q) + L1 L2) / smooth and write the model."""
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
    write_model(tmp, dense_state(model, dtype, set()), model.config, dtype, None)
    return report


@torch.no_grad()
def _write(model: nn.Module, tmp: Path, target: str, convert: bool, dtype: torch.dtype, tokenizer, name: str):
    """Write `model` as `target` into `tmp`; return (per-layer report, largest logit change on probe ids)."""
    if target == "gguf":  # before any conversion work
        check_llama(model.config)
    ids = probe_ids(model)
    before = model(ids).logits.float()
    if target == "dense":
        layers = _write_dense(model, tmp, dtype)
        model.to(dtype).float()  # no QLinear left: run the written weights in float32
    else:
        layers = prepare(model, FORMATS[target], convert, dtype)
    diff = float((model(ids).logits.float() - before).abs().max())
    if target != "dense" and not any("converted" in e for e in layers.values()):
        if diff > 1e-4 * float(before.abs().max()):
            raise ExportError(f"folding the smoothing into the norms changed the logits by {diff:.3g}")
    if target == "gguf":
        write_gguf(model, tmp, dtype, tokenizer, name)
    elif target == "compressed-tensors":
        write_ct(model, tmp, dtype)
    if tokenizer is not None and target != "gguf":  # a GGUF file carries its own
        tokenizer.save_pretrained(tmp)
    return layers, diff


def export(
    checkpoint: str | Path,
    out: str | Path,
    target: str,
    *,
    convert: bool = False,
    dtype: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Export the lowbit checkpoint folder `checkpoint` as `target` into `out`; return the report.

    dtype: "float16" | "bfloat16" | "float32" of every floating tensor written (scales and low-rank
    factors too); default the dtype of the checkpoint's unquantized tensors. The report holds per-layer
    entries and `logits_max_abs_diff`, the largest logit change against the checkpoint on 32 probe tokens
    of the exported weights (dense: as written, run in float32; compressed-tensors and GGUF: after
    folding and conversion, before the cast to `dtype` and, for GGUF, to fp16 block scales).
    GGUF needs a Llama model, `dtype` float32 / float16 / bfloat16 and the checkpoint's tokenizer.
    """
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    checkpoint, out = Path(checkpoint), Path(out)
    read_manifest(checkpoint)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ExportError(f"output folder {out} exists; pass --overwrite to replace it")
    model, tokenizer = load(checkpoint, backend="reference"), load_tokenizer(checkpoint)
    torch_dtype = DTYPES[dtype] if dtype else model.get_input_embeddings().weight.dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        layers, diff = _write(model, tmp, target, convert, torch_dtype, tokenizer, checkpoint.resolve().name)
        move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    adapter = next((p for p in (out / ADAPTER_DIR, out / ADAPTER_FILE) if p.exists()), None)
    return {
        "checkpoint": str(checkpoint),
        "out": str(out),
        "target": target,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "adapter": None if adapter is None else str(adapter),
        "converted": sum("converted" in e for e in layers.values()),
        "logits_max_abs_diff": diff,
        "layers": layers,
    }


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Register `lowbit export` on the CLI's subparsers; returns its parser."""
    e = subparsers.add_parser(
        "export", help="export a lowbit checkpoint for vLLM/SGLang, llama.cpp (GGUF) or as a dense model"
    )
    e.add_argument("checkpoint", help="lowbit checkpoint folder")
    e.add_argument("--to", required=True, choices=TARGETS, dest="target", help="export target")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument(
        "--convert",
        action="store_true",
        help="re-quantize layers the target format cannot hold (default: refuse and list them)",
    )
    e.add_argument("--dtype", choices=tuple(DTYPES), help="dtype written (default: the checkpoint's)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return e


def cmd_export(args: argparse.Namespace) -> dict:
    a = args
    return export(a.checkpoint, a.out, a.target, convert=a.convert, dtype=a.dtype, overwrite=a.overwrite)


def print_export(r: dict) -> None:
    """The text form of an export report."""
    for name, e in r["layers"].items():
        note = f"  converted: {e['converted']}" if "converted" in e else ""
        print(f"{name:<48} {e['source']:<18} -> {e['target']:<18} rel. error {e['rel_error']:.2e}{note}")
    adapter = f", low-rank adapter in {r['adapter']}" if r["adapter"] else ""
    print(
        f"wrote {r['out']} ({r['target']}, {r['dtype']}{adapter}): {len(r['layers'])} layers, "
        f"{r['converted']} converted, max logit change {r['logits_max_abs_diff']:.3g}"
    )
