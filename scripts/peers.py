"""Peers in the same run: other libraries' quantizers on lowbit's model, text and bits-per-weight accounting.

Usage:
    python scripts/peers.py [--model smollm2-135m] [--data builtin:lee-news] [--samples 16] [--seq-len 512]
        [--eval builtin:lee-news,builtin:bible] [--eval-tokens 16384] [--only ROW,...] [--skip-original]
        [--json results.json] [--list]

Every row starts from the same model (lowbit's loader: the built-in GGUF as a transformers model, fp32),
quantizes the layers lowbit quantizes (`lowbit.compress.uniform.selected_names`: every nn.Linear of the
decoder blocks, not lm_head) with the peer's own library, calibrating (where the method calibrates) on
lowbit's calibration blocks, and reads the perplexity of the held-out part of each --eval text with
`lowbit.eval.perplexity` (the same tokens and windows as scripts/quality.py). The quantized weights are
evaluated dequantized into the fp32 model (what lowbit's reference backend computes for its own rows).

Bits per weight count what each library stores for those layers over their weights, mapped onto lowbit's
parts (`STORED`): codes, scales (with second-level scales), zeros and low-rank factors at the dtypes the
library stores them in; metadata that lowbit keeps in its JSON manifest (shapes, bit widths, the fixed
code tables of a format) is not counted. A tensor name a format does not list is an error, so nothing the
library stores is silently left out.

The peer packages are optional (`pip install 'lowbit[peers]'`: HQQ and bitsandbytes); llm-compressor pins
its own transformers and compressed-tensors versions and goes in a virtual environment of its own
(docs/benchmarks.md, "Peers, same model, text and accounting"). A row whose package is missing stops the
script before any work with the package's name. Rows labelled "re-implementation" are lowbit's own code
standing in for a peer that cannot run here; rows labelled "lowbit" are lowbit's for comparison.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from unittest.mock import patch

import torch
from torch import Tensor, nn

# How each format's stored tensors of one layer map onto lowbit's parts (None: metadata, not counted).
HQQ_META = (
    "nbits group_size shape axis packing unpack_view_dtype view_as_float quant_scale quant_zero "
    "compute_dtype offload_meta encoded_state_dict stores_quant_config channel_wise optimize round_zero bias"
).split()
STORED = {
    # HQQ (Badri & Shaji 2023): W_q packed codes (3-bit: ten codes per int32), a float scale and a float
    # zero (not rounded) per group of the flattened weight, in the compute dtype (fp16 here).
    "hqq": {"W_q": "codes", "scale": "scales", "zero": "zeros", **dict.fromkeys(HQQ_META)},
    # bitsandbytes NF4 (QLoRA, Dettmers et al. 2023): two codes per uint8; an absmax per 64 weights,
    # double-quantized to uint8 with an fp32 absmax per 256 of them and one fp32 offset; the 16-entry NF4
    # table and the 256-entry dynamic map are fixed tables of the format.
    "bnb-nf4": {
        "weight": "codes",
        "absmax": "scales",
        "nested_absmax": "scales",
        "nested_offset": "scales",
        "quant_map": None,
        "nested_quant_map": None,
    },
    # compressed-tensors "pack-quantized" (llm-compressor's checkpoints): codes packed densely into int32,
    # a scale per group in the model's dtype, integer zero points per group packed into int32 along the
    # output rows, the shape as metadata.
    "compressed-tensors": {
        "weight_packed": "codes",
        "weight_scale": "scales",
        "weight_zero_point": "zeros",
        "weight_g_idx": "codes",
        "weight_shape": None,
        "bias": None,
    },
    # lowbit's QLinear (`lowbit.quantizers.layout.stored_layout`), as `lowbit.nn.checkpoint.plan_bits`.
    "lowbit": {
        "codes": "codes",
        "scales": "scales",
        "dq_absmax": "scales",
        "zeros": "zeros",
        "l1": "lowrank",
        "l2": "lowrank",
        "smooth": "scales",
        "bias": None,
    },
}
PARTS = ("codes", "scales", "zeros", "lowrank")


class PeerError(ValueError):
    """A peer's stored tensors do not match the format's documented layout."""


def layer_bits(fmt: str, stored: dict[str, Tensor]) -> dict[str, int]:
    """{part: stored bits} of one layer from the tensors `fmt` stores for it (dtype as stored)."""
    table = STORED[fmt]
    unknown = sorted(set(stored) - set(table))
    if unknown:
        raise PeerError(f"{fmt} stores {unknown}, which its accounting does not map")
    bits = dict.fromkeys(PARTS, 0)
    for name, t in stored.items():
        if table[name] is not None:
            bits[table[name]] += t.numel() * t.element_size() * 8
    return bits


def bits_per_weight(layers: dict[str, dict[str, int]], shapes: dict[str, tuple[int, int]]) -> dict:
    """Totals over the quantized layers: {"bits_per_weight": float, part: bits per weight, ...}."""
    if set(layers) != set(shapes):
        odd = sorted(set(layers) ^ set(shapes))
        raise PeerError(f"accounted layers differ from the quantized ones: {odd}")
    weights = sum(n * k for n, k in shapes.values())
    parts = {p: sum(b[p] for b in layers.values()) / weights for p in PARTS}
    return {"bits_per_weight": sum(parts.values()), **parts}


def bnb_stored(q: Tensor, state) -> dict[str, Tensor]:
    """What bitsandbytes' QuantState of a double-quantized NF4 weight stores, by its serialized names."""
    return {
        "weight": q,
        "absmax": state.absmax,
        "nested_absmax": state.state2.absmax,
        "nested_offset": torch.as_tensor(state.offset, dtype=torch.float32),
        "quant_map": state.code,
        "nested_quant_map": state.state2.code,
    }


def quantize_hqq(model: nn.Module, names: list[str], blocks: Tensor, tok, *, bits: int, group: int):
    """HQQ (half-quadratic quantization, no calibration data) of every layer, through `hqq`'s HQQLinear."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=bits, group_size=group, axis=1)
    layers = {}
    for name in names:
        lin = model.get_submodule(name)
        hq = HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float16, device="cpu", del_orig=False)
        layers[name] = layer_bits("hqq", hq.state_dict())
        lin.weight.data = hq.dequantize().to(lin.weight.dtype).reshape(lin.weight.shape)
    return model, layers


def quantize_bnb_nf4(model: nn.Module, names: list[str], blocks: Tensor, tok):
    """bitsandbytes NF4, blocks of 64, double quantization (QLoRA's storage), `quantize_4bit` on the CPU."""
    import bitsandbytes.functional as F

    layers = {}
    for name in names:
        lin = model.get_submodule(name)
        q, state = F.quantize_4bit(lin.weight.data, blocksize=64, compress_statistics=True, quant_type="nf4")
        layers[name] = layer_bits("bnb-nf4", bnb_stored(q, state))
        lin.weight.data = F.dequantize_4bit(q, state).to(lin.weight.dtype)
    return model, layers


def quantize_llmc(
    model: nn.Module, names: list[str], blocks: Tensor, tok, *, method: str, bits: int, group: int
):
    """llm-compressor's `oneshot` with its GPTQ or AWQ modifier (asymmetric int, groups along the input),
    then the compressed-tensors checkpoint it writes, read back for the accounting."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from safetensors import safe_open

    # its int packing stores the scales in the model's dtype (fp32 here; its scale_dtype is read by the
    # fp4 / mx formats only)
    args = QuantizationArgs(num_bits=bits, group_size=group, strategy="group", symmetric=False)
    scheme = QuantizationScheme(targets=[f"re:^{n}$" for n in names], weights=args)
    modifier = {"gptq": GPTQModifier, "awq": AWQModifier}[method]
    ds = Dataset.from_dict({"input_ids": blocks.tolist(), "attention_mask": torch.ones_like(blocks).tolist()})
    recipe = modifier(config_groups={"group_0": scheme}, ignore=["lm_head"], bypass_divisibility_checks=True)
    n, L = blocks.shape
    # llm-compressor 0.14's AWQ pins its cached activations (a host-to-device transfer speed-up), which a
    # CPU-only torch refuses: without an accelerator the pinning is skipped, the numbers are unchanged
    no_pin = patch.object(IntermediatesCache, "pin_memory", lambda *a, **k: None)
    with (
        tempfile.TemporaryDirectory() as work,
        no_pin if not torch.accelerator.is_available() else nullcontext(),
    ):
        # oneshot (and its save) re-read the config from model.config.name_or_path: a folder with config.json
        model.config.save_pretrained(work)
        model.config.name_or_path = work
        model = oneshot(
            model=model, processor=tok, dataset=ds, recipe=recipe, num_calibration_samples=n, max_seq_length=L
        )
        # saving compresses the modules it saves: a copy keeps the model to evaluate as oneshot left it
        out = Path(work) / "compressed"
        copy.deepcopy(model).save_pretrained(out, save_compressed=True)
        stored = {}
        for f in out.glob("*.safetensors"):
            with safe_open(f, "pt") as st:
                stored.update({k: st.get_tensor(k) for k in st.keys()})
    layers = {n: layer_bits("compressed-tensors", _prefixed(stored, n)) for n in names}
    return model, layers


def _prefixed(stored: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    return {k[len(name) + 1 :]: v for k, v in stored.items() if k.startswith(name + ".")}


def quantize_lowbit(
    model: nn.Module, names: list[str], blocks: Tensor, tok, *, quantize: dict, scaling: dict
):
    """lowbit's own `compress` with one spec for every layer (scripts/quality.py's rows)."""
    from lowbit.compress.api import compress
    from lowbit.compress.recipe import Recipe

    recipe = Recipe.from_dict({"quantize": quantize, "scaling": scaling})
    model, _ = compress(model, recipe, tokenizer=tok, calib_data=blocks, progress=False)
    return model, {n: layer_bits("lowbit", model.get_submodule(n).state_dict()) for n in names}


@dataclass(frozen=True)
class Row:
    """One table row: who made it (label), the package it needs (None: lowbit alone), the quantizer."""

    label: str
    package: str | None
    quantize: object


AWQ = {"method": "awq"}
GPTQ3 = {"format": "int3", "group_size": 128, "rounding": "gptq"}
ROWS = {
    "hqq:w4-g128": Row("HQQ", "hqq", partial(quantize_hqq, bits=4, group=128)),
    "hqq:w3-g128": Row("HQQ", "hqq", partial(quantize_hqq, bits=3, group=128)),
    "hqq:w2-g64": Row("HQQ", "hqq", partial(quantize_hqq, bits=2, group=64)),
    "bnb:nf4-g64-dq": Row("bitsandbytes", "bitsandbytes", quantize_bnb_nf4),
    "llmc-gptq:w3-g64": Row(
        "llm-compressor", "llmcompressor", partial(quantize_llmc, method="gptq", bits=3, group=64)
    ),
    "llmc-awq:w3-g64": Row(
        "llm-compressor", "llmcompressor", partial(quantize_llmc, method="awq", bits=3, group=64)
    ),
    "lowbit-rtn:int4-g128": Row(
        "lowbit", None, partial(quantize_lowbit, quantize={"format": "int4", "group_size": 128}, scaling={})
    ),
    "lowbit-rtn:int3-g128": Row(
        "lowbit", None, partial(quantize_lowbit, quantize={"format": "int3", "group_size": 128}, scaling={})
    ),
    "lowbit-rtn:int3-g64": Row(
        "lowbit", None, partial(quantize_lowbit, quantize={"format": "int3", "group_size": 64}, scaling={})
    ),
    "lowbit-gptq:int3-g128": Row("lowbit", None, partial(quantize_lowbit, quantize=GPTQ3, scaling={})),
    "lowbit-awq:int3-g128": Row(
        "lowbit", None, partial(quantize_lowbit, quantize={"format": "int3", "group_size": 128}, scaling=AWQ)
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="builtin:lee-news")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval", default="builtin:lee-news,builtin:bible", help="comma-separated held-out texts")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--only", default=None, help=f"comma-separated rows (default: all): {', '.join(ROWS)}")
    p.add_argument("--skip-original", action="store_true")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--list", action="store_true", help="list the rows and whether their package is installed")
    args = p.parse_args(argv)
    rows = args.only.split(",") if args.only else list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(ROWS)}")
    args.rows = rows
    return args


def missing_packages(rows: list[str]) -> list[str]:
    """The packages the rows need that are not installed, in row order, each once."""
    need = dict.fromkeys(ROWS[r].package for r in rows if ROWS[r].package)
    return [p for p in need if importlib.util.find_spec(p) is None]


def version(dist: str) -> str:
    """The installed version of a distribution (the peers' module names are their distribution names)."""
    from importlib.metadata import version as v

    return v(dist)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for r in args.rows:
            pkg = ROWS[r].package
            ok = "installed" if pkg is None or not missing_packages([r]) else f"needs {pkg}"
            print(f"{r:<24} {ROWS[r].label:<16} {ok}")
        return 0
    missing = missing_packages(args.rows)
    if missing:
        print(
            f"peers.py: missing package(s) {', '.join(missing)}: pip install 'lowbit[peers]' "
            "(llm-compressor: see docs/benchmarks.md)",
            file=sys.stderr,
        )
        return 1
    from lowbit.calibration.data import calibration_blocks, eval_tokens
    from lowbit.compress.recipe import Recipe
    from lowbit.compress.uniform import selected_names
    from lowbit.eval.perplexity import dense_bits_per_weight, perplexity
    from lowbit.models import load_model

    base, tok = load_model(args.model)
    sources = args.eval.split(",")
    ids = {src: eval_tokens(tok, src, max_tokens=args.eval_tokens) for src in sources}
    blocks = calibration_blocks(tok, args.data, args.samples, args.seq_len, seed=0)
    names = selected_names(base, Recipe.from_dict({"quantize": {"format": "int4"}}))
    shapes = {n: tuple(base.get_submodule(n).weight.shape) for n in names}

    def perplexities(model) -> dict[str, float]:
        return {src: perplexity(model, t, progress=False)["perplexity"] for src, t in ids.items()}

    heads = " ".join(f"{'ppl ' + src.removeprefix('builtin:'):>14}" for src in sources)
    print(f"{'row':<24} {'library':<22} {'bpw':>6} {heads} {'time s':>7}", flush=True)
    rows = []
    meta = {k: getattr(args, k) for k in ("model", "data", "samples", "seq_len")}
    meta["eval_tokens"] = {src: len(t) for src, t in ids.items()}
    meta["versions"] = {"torch": torch.__version__, "transformers": version("transformers")}

    def emit(row: dict) -> None:
        """Print a row; rewrite the JSON file with every row so far (a killed run keeps its rows)."""
        rows.append(row)
        cells = " ".join(f"{v:>14.3f}" for v in row["ppl"].values())
        lib = f"{row['library']} {row['version']}"
        print(f"{row['row']:<24} {lib:<22} {row['bpw']:>6.3f} {cells} {row['seconds']:>7}", flush=True)
        if args.json:
            tmp = Path(args.json).with_suffix(".tmp")
            tmp.write_text(json.dumps({**meta, "rows": rows}, indent=2))
            tmp.replace(args.json)

    if not args.skip_original:
        bpw = dense_bits_per_weight(base)
        emit(dict(row="original", library="fp32", version="", bpw=bpw, ppl=perplexities(base), seconds=0.0))
    for r in args.rows:
        spec = ROWS[r]
        t0 = time.perf_counter()
        model, layers = spec.quantize(copy.deepcopy(base), names, blocks, tok)
        seconds = round(time.perf_counter() - t0, 1)
        totals = bits_per_weight(layers, shapes)
        emit(
            dict(
                row=r,
                library=spec.label,
                version=version(spec.package or "lowbit"),
                bpw=totals["bits_per_weight"],
                parts={p: totals[p] for p in PARTS},
                ppl=perplexities(model),
                seconds=seconds,
            )
        )
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
