"""Deployable exports of a lowbit checkpoint: compressed-tensors (+ a PEFT LoRA adapter) and merged dense.

- `compressed-tensors` (served by vLLM and SGLang): each quantized layer's base Q in the layout of the
  compressed-tensors library: INT4 / INT8 as `pack-quantized` (`weight_packed` int32 [N, ceil(K b / 32)],
  the codes' bit stream; `weight_scale` [N, G]; `weight_zero_point` int32 [ceil(N b / 32), G] packed along
  the rows, asymmetric only; `weight_shape` [2]), FP8 E4M3 per-channel as `float-quantized` (`weight`
  float8_e4m3fn [N, K], `weight_scale` [N, 1]). The low-rank branch L1 L2 goes to `adapter/`, a PEFT LoRA
  adapter (lora_B = L1, lora_A = L2, lora_alpha = r: scaling 1). SVDQuant smoothing is folded into the
  norm that feeds the layer (its weight divided by `smooth`) when every layer reading that norm shares the
  smoothing vector; layers whose format (or smoothing) the layout cannot express are refused, or with
  `convert=True` re-quantized (round to nearest) to the nearest format it can, each layer's relative
  weight error reported.
- `dense`: a plain transformers checkpoint of W = (dequantize(Q) + L1 L2) / smooth in fp16 / bf16 / fp32.

Everything is written into a hidden sibling folder and renamed into place, like `checkpoint.save`.
"""

from __future__ import annotations

import argparse
import copy
import json
import secrets
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.compress.checkpoint import _move_into_place, load, load_tokenizer, read_manifest
from lowbit.compress.qlinear import QLinear, set_submodule
from lowbit.quantizers import (
    QuantSpec,
    decode_scales,
    dequantize,
    expand_groups,
    pack,
    quantize,
    unpack_codes,
)

TARGETS = ("compressed-tensors", "dense")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ADAPTER_DIR = "adapter"
CT_GROUP_SIZES = (128, 64, 32, 16, 8)  # fallbacks for ragged groups, largest first


class ExportError(ValueError):
    """An export that cannot be done as asked: unknown target, inexpressible layers, existing output."""


def ct_problem(spec: QuantSpec, in_features: int) -> str | None:
    """Why compressed-tensors (as vLLM serves it) cannot hold Q of this spec as is, or None if it can."""
    if spec.kind == "fp":
        if spec.format != "fp8_e4m3":
            return f"{spec.format} has no compressed-tensors layout"
        return None if spec.group_size is None else "FP8 is exported per-channel only"
    if spec.kind == "nf":
        return f"{spec.format} (a NormalFloat codebook) has no compressed-tensors layout"
    if spec.bits not in (4, 8):
        return f"{spec.format}: vLLM serves 4- and 8-bit integer weights only"
    if spec.bits == 8 and not spec.symmetric:
        return "asymmetric int8: vLLM serves 8-bit weights symmetric only"
    if spec.group_size is not None and in_features % spec.group_size:
        return f"group size {spec.group_size} does not divide in_features {in_features} (ragged last group)"
    return None


def ct_spec(spec: QuantSpec, in_features: int, dtype: torch.dtype) -> QuantSpec:
    """The nearest spec compressed-tensors can hold: INT4 (NF, FP4, INT2/3), symmetric INT8, FP8 E4M3
    per-channel; a ragged group size falls to the largest of CT_GROUP_SIZES that divides K (else per-channel);
    scales stored in the export dtype."""
    scale_dtype = str(dtype).removeprefix("torch.")
    if spec.kind == "fp" and spec.bits == 8:
        return QuantSpec("fp8_e4m3", None, True, scale_dtype)
    bits = 8 if spec.format == "int8" else 4
    symmetric = spec.symmetric or bits == 8
    g = spec.group_size
    if g is not None and in_features % g:
        g = next((c for c in CT_GROUP_SIZES if c <= g and in_features % c == 0), None)
    return QuantSpec(f"int{bits}", g, symmetric, scale_dtype)


def _probe_ids(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (2, 16), generator=g)


def _keep(store: dict, name: str, value) -> None:
    """Record a hook's first value; returns None so that the hook changes nothing."""
    store.setdefault(name, value)


@torch.no_grad()
def _norm_readers(model: nn.Module, ids: torch.Tensor) -> dict[str, tuple[list[str], torch.Tensor]]:
    """{norm name: (linear layers whose input is exactly that norm's output, the norm's input)} for the
    leaf modules with a 1-D weight (RMSNorm, LayerNorm), found by running the model once with hooks."""
    norms, inputs, hooks = {}, {}, []  # norms: name -> (input, output); tensors kept alive, so ids are unique
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, QLinear)):
            hooks.append(m.register_forward_pre_hook(lambda _, a, n=name: _keep(inputs, n, a[0])))
        elif not list(m.children()) and getattr(getattr(m, "weight", None), "ndim", 0) == 1:
            hooks.append(m.register_forward_hook(lambda _, a, out, n=name: _keep(norms, n, (a[0], out))))
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    by_id = {id(out): n for n, (_, out) in norms.items()}
    readers: dict[str, tuple[list[str], torch.Tensor]] = {}
    for lin, x in inputs.items():
        if id(x) in by_id:
            norm = by_id[id(x)]
            readers.setdefault(norm, ([], norms[norm][0]))[0].append(lin)
    return readers


@torch.no_grad()
def _fold_smoothing(model: nn.Module, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Fold each shared smoothing vector into the norm feeding its layers, in place.

    Returns ({folded layer: its former smooth [K]}, {smoothed layer left smoothed: why}). A norm is
    folded only when every linear reading it is a QLinear with that same smooth or a dense Linear (which
    absorbs diag(smooth) into its weight) and the folded norm's output checks out as old output / smooth.
    """
    folded, why = {}, {}
    for norm_name, (readers, x) in _norm_readers(model, ids).items():
        layers = {n: model.get_submodule(n) for n in readers}
        smoothed = [n for n, m in layers.items() if isinstance(m, QLinear) and m.smooth is not None]
        if not smoothed:
            continue
        smooth = layers[smoothed[0]].smooth
        plain = [n for n, m in layers.items() if isinstance(m, QLinear) and m.smooth is None]
        if plain or any(not torch.equal(layers[n].smooth, smooth) for n in smoothed):
            reason = f"the layers reading {norm_name} do not share one smoothing vector"
            why.update({n: reason for n in smoothed})
            continue
        norm = model.get_submodule(norm_name)
        before = norm(x)
        saved = {k: v.clone() for k, v in norm.state_dict().items()}
        norm.weight.data = norm.weight.data / smooth.to(norm.weight.dtype)
        if getattr(norm, "bias", None) is not None:
            norm.bias.data = norm.bias.data / smooth.to(norm.bias.dtype)
        expected = before / smooth.to(before.dtype)
        if not torch.allclose(norm(x), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max())):
            norm.load_state_dict(saved)
            why.update({n: f"{norm_name} does not scale linearly with its weight" for n in smoothed})
            continue
        for m in layers.values():
            if isinstance(m, nn.Linear):
                m.weight.data = m.weight.data * smooth.to(m.weight.dtype)
        for n in smoothed:
            layers[n].smooth = None
            folded[n] = smooth
    return folded, why


def _effective_weight(m: QLinear) -> torch.Tensor:
    """What the layer multiplies its input by: (dequantize(Q) + L1 L2) / smooth, float32 [N, K]."""
    W = dequantize(m.qtensor())
    if m.l1 is not None:
        W = W + m.l1.float() @ m.l2.float()
    return W if m.smooth is None else W / m.smooth.float()


@torch.no_grad()
def _requantize(m: QLinear, spec: QuantSpec) -> QLinear:
    """A QLinear of `spec` without smoothing that computes what `m` does, its base re-quantized (RTN):
    Q' = quantize(dequantize(Q) / smooth), L2' = L2 / smooth, L1 and bias kept."""
    N, K = m.out_features, m.in_features
    inv = torch.ones(K, device=m.codes.device) if m.smooth is None else 1 / m.smooth.float()  # [K]
    dtype = next((t.dtype for t in (m.l1, m.bias, m.smooth) if t is not None), torch.float32)
    out = QLinear(K, N, spec, m.rank, m.bias is not None, False, dtype, m.codes.device, m.backend)
    l2 = None if m.l2 is None else (m.l2.float() * inv).to(m.l2.dtype)
    out.replace_weight(quantize(dequantize(m.qtensor()) * inv, spec), m.l1, l2)
    if m.bias is not None:
        out.bias.data.copy_(m.bias)
    return out


def _ct_values(m: QLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes uint8 [N, K], grid values float32 [N, K]: c - z, c - 2^(b-1) or the FP8 value,
    scales float32 [N, G], zeros float32 [N, G] or None)."""
    q = m.qtensor()
    codes, (s, z) = unpack_codes(q), decode_scales(q)
    if m.spec.kind == "fp":
        return codes, codes.view(torch.float8_e4m3fn).float(), s, z
    K, gs = m.in_features, m.spec.group_size or m.in_features
    return codes, codes.float() - (2.0 ** (m.spec.bits - 1) if z is None else expand_groups(z, K, gs)), s, z


def _ct_weight(m: QLinear, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as compressed-tensors decodes it: grid value * scale, both in `dtype` (float32 out)."""
    _, v, s, _ = _ct_values(m)
    s = expand_groups(s, m.in_features, m.spec.group_size or m.in_features)
    return (v.to(dtype) * s.to(dtype)).float()


def _pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' pack_to_int32 of uint8 codes [R, C]: the same LSB-first bit stream as lowbit's
    `pack`, cut into little-endian int32 words -> int32 [R, ceil(C * bits / 32)]."""
    R, C = codes.shape
    b = pack(codes, bits)
    b = torch.nn.functional.pad(b, (0, -b.shape[1] % 4)).to(torch.int64).view(R, -1, 4)
    w = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    return w[:, : -(-C * bits // 32)].contiguous()


def _ct_layer(fqn: str, m: QLinear, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(tensors by name, compressed-tensors weight args, format) of one quantized layer."""
    N, K = m.out_features, m.in_features
    codes, _, s, z = _ct_values(m)
    spec = m.spec
    t = {f"{fqn}.weight_scale": s.to(dtype).contiguous()}
    args = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "dynamic": False}
    args.update(strategy="group" if spec.group_size else "channel", group_size=spec.group_size)
    if spec.kind == "fp":
        t[f"{fqn}.weight"] = codes.view(torch.float8_e4m3fn)
        args.update(type="float", strategy="channel", group_size=None)
        return t, args, "float-quantized"
    t[f"{fqn}.weight_packed"] = _pack_int32(codes, spec.bits)
    t[f"{fqn}.weight_shape"] = torch.tensor([N, K], dtype=torch.int64)
    if z is not None:  # packed along the rows (compressed-tensors' packed_dim=0)
        zp = _pack_int32(z.to(torch.uint8).T.contiguous(), spec.bits)  # [G, ceil(N b / 32)]
        t[f"{fqn}.weight_zero_point"] = zp.T.contiguous()
    return t, args, "pack-quantized"


@torch.no_grad()
def _prepare_ct(model: nn.Module, convert: bool, dtype: torch.dtype) -> dict[str, dict]:
    """Fold smoothing and re-quantize what compressed-tensors cannot hold (or refuse), in place.

    Returns the per-layer report: source and target spec, rank, what happened to the smoothing, why the
    layer was converted, and rel_error = ||W' - W|| / ||W|| of the weight a compressed-tensors consumer
    computes (base decoded in `dtype`, plus L1 L2 in `dtype`, seen from the layer's original input).
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    reference = {n: _effective_weight(m) for n, m in layers.items()}
    folded, smooth_why = _fold_smoothing(model, _probe_ids(model))
    for n, m in layers.items():
        if m.smooth is not None and n not in smooth_why:
            smooth_why[n] = "its input does not come straight from a norm, so its smoothing cannot be folded"
    problems = {n: ct_problem(m.spec, m.in_features) or smooth_why.get(n) for n, m in layers.items()}
    problems = {n: p for n, p in problems.items() if p}
    if problems and not convert:
        listed = "; ".join(f"{n}: {p}" for n, p in list(problems.items())[:20])
        listed += f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ExportError(
            f"{len(problems)} layer(s) cannot be exported to compressed-tensors as they are "
            f"(pass --convert to re-quantize them): {listed}"
        )
    report = {}
    for n, m in layers.items():
        entry = {"source": m.spec.short(), "rank": m.rank, "smooth": "folded" if n in folded else None}
        if n in problems:
            m = _requantize(m, ct_spec(m.spec, m.in_features, dtype))
            set_submodule(model, n, m)
            entry.update(converted=problems[n], smooth="re-quantized" if n in smooth_why else entry["smooth"])
        W = _ct_weight(m, dtype)
        if m.l1 is not None:
            W = W + m.l1.to(dtype).float() @ m.l2.to(dtype).float()
        if n in folded:
            W = W / folded[n].float()
        err = float((W - reference[n]).norm() / reference[n].norm().clamp_min(1e-30))
        report[n] = {**entry, "target": m.spec.short(), "rel_error": err}
    return report


def _dense_state(model: nn.Module, dtype: torch.dtype, skip: set[str]) -> dict[str, torch.Tensor]:
    """The state dict without the modules in `skip` and without tied copies, floating tensors in `dtype`."""
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        if name.rpartition(".")[0] in skip:
            continue
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if t.numel() and key in seen:  # a tied copy: transformers re-ties it on load
            continue
        seen.add(key)
        state[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous().cpu()
    return state


def _ct_config(groups: dict[str, list], ignore: list[str]) -> dict:
    """config.json's quantization_config for compressed-tensors: one config group per distinct scheme,
    targeting its layers by exact name; format per group ("mixed-precision" on top when they differ)."""
    config_groups = {}
    for i, (key, names) in enumerate(groups.items()):
        args, fmt = json.loads(key)
        scheme = {"targets": names, "weights": args, "input_activations": None, "output_activations": None}
        config_groups[f"group_{i}"] = {**scheme, "format": fmt}
    formats = {g["format"] for g in config_groups.values()}
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    head = {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed"}
    return {**head, "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None}


def _adapter(layers: dict[str, QLinear], dtype: torch.dtype) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(adapter_config, tensors) of a PEFT LoRA adapter holding every L1 L2: lora_B = L1 [N, r],
    lora_A = L2 [r, K], lora_alpha = r per layer (scaling 1); None when no layer has a low-rank part."""
    ranks = {n: m.rank for n, m in layers.items() if m.rank}
    if not ranks:
        return None
    r = max(ranks.values())
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=r, target_modules=sorted(ranks))
    config.update(rank_pattern=ranks, alpha_pattern=ranks, lora_dropout=0.0, bias="none", use_rslora=False)
    tensors = {}
    for n in ranks:  # PEFT's saved names: base_model.model.{module}.lora_{A,B}.weight
        tensors[f"base_model.model.{n}.lora_A.weight"] = layers[n].l2.detach().to(dtype).contiguous().cpu()
        tensors[f"base_model.model.{n}.lora_B.weight"] = layers[n].l1.detach().to(dtype).contiguous().cpu()
    return config, tensors


def _write_ct(model: nn.Module, tmp: Path, dtype: torch.dtype) -> None:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    state = _dense_state(model, dtype, set(layers))
    groups: dict[str, list[str]] = {}
    for n, m in layers.items():
        tensors, args, fmt = _ct_layer(n, m, dtype)
        state.update(tensors)
        if m.bias is not None:
            state[f"{n}.bias"] = m.bias.detach().to(dtype).contiguous()
        groups.setdefault(json.dumps([args, fmt]), []).append(n)
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    _write_model(tmp, state, model.config, dtype, _ct_config(groups, ignore))
    adapter = _adapter(layers, dtype)
    if adapter is not None:
        (tmp / ADAPTER_DIR).mkdir()
        (tmp / ADAPTER_DIR / "adapter_config.json").write_text(json.dumps(adapter[0], indent=2) + "\n")
        save_file(adapter[1], str(tmp / ADAPTER_DIR / "adapter_model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def _write_dense(model: nn.Module, tmp: Path, dtype: torch.dtype) -> dict[str, dict]:
    """Replace every QLinear by an nn.Linear of W = (dequantize(Q) + L1 L2) / smooth and write the model."""
    report = {}
    for n, m in [(n, m) for n, m in model.named_modules() if isinstance(m, QLinear)]:
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype)
        W = _effective_weight(m)
        lin.weight.data = W.to(dtype)
        if m.bias is not None:
            lin.bias.data = m.bias.detach().to(dtype)
        set_submodule(model, n, lin)
        err = float((W.to(dtype).float() - W).norm() / W.norm().clamp_min(1e-30))
        report[n] = {"source": m.spec.short(), "rank": m.rank, "target": "dense", "rel_error": err}
    _write_model(tmp, _dense_state(model, dtype, set()), model.config, dtype, None)
    return report


def _write_model(tmp: Path, state: dict, config, dtype: torch.dtype, quant_config: dict | None) -> None:
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if quant_config is not None:
        config.quantization_config = quant_config
    config.dtype = dtype
    config.save_pretrained(tmp)


@torch.no_grad()
def _write(model: nn.Module, tmp: Path, target: str, convert: bool, dtype: torch.dtype) -> tuple[dict, float]:
    """Write `model` as `target` into `tmp`; return (per-layer report, largest logit change on probe ids)."""
    ids = _probe_ids(model)
    before = model(ids).logits.float()
    if target == "dense":
        layers = _write_dense(model, tmp, dtype)
        model.to(dtype).float()  # no QLinear left: run the written weights in float32
    else:
        layers = _prepare_ct(model, convert, dtype)
    diff = float((model(ids).logits.float() - before).abs().max())
    if target != "dense":
        if not any("converted" in e for e in layers.values()) and diff > 1e-4 * float(before.abs().max()):
            raise ExportError(f"folding the smoothing into the norms changed the logits by {diff:.3g}")
        _write_ct(model, tmp, dtype)
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
    of the exported weights (dense: as written, run in float32; compressed-tensors: after folding and
    conversion, before the cast to `dtype`).
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
        layers, diff = _write(model, tmp, target, convert, torch_dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    adapter = out / ADAPTER_DIR if (out / ADAPTER_DIR).is_dir() else None
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
    e = subparsers.add_parser("export", help="export a lowbit checkpoint for vLLM/SGLang or as a dense model")
    e.add_argument("checkpoint", help="lowbit checkpoint folder")
    e.add_argument("--to", required=True, choices=TARGETS, dest="target", help="export target")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument(
        "--convert",
        action="store_true",
        help="re-quantize layers compressed-tensors cannot hold (default: refuse and list them)",
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
