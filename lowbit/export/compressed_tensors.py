"""The compressed-tensors export (served by vLLM and SGLang) and its PEFT LoRA adapter.

Each quantized layer's base Q goes in the layout of the compressed-tensors library: INT4 / INT8 as
`pack-quantized` (`weight_packed` int32 [N, ceil(K b / 32)], the codes' bit stream; `weight_scale`
[N, G]; `weight_zero_point` int32 [ceil(N b / 32), G] packed along the rows, asymmetric only;
`weight_shape` [2]), FP8 E4M3 per-channel as `float-quantized` (`weight` float8_e4m3fn [N, K],
`weight_scale` [N, 1]). The low-rank branch L1 L2 goes to `adapter/`, a PEFT LoRA adapter (lora_B = L1,
lora_A = L2, lora_alpha = r: scaling 1). What the layout cannot hold is refused or converted by
`lowbit.export.fit`. `reload_ct` loads such a folder back as transformers (+ PEFT) computes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from torch import nn

from lowbit.export.files import dense_state, safetensors_bits, write_model
from lowbit.export.target import Target
from lowbit.models.errors import ModelError, call_loader
from lowbit.models.source import from_pretrained, hf_tokenizer
from lowbit.nn.qlinear import QLinear
from lowbit.quantizers import QuantSpec, decode_scales, expand_groups, pack, unpack_codes

ADAPTER_DIR = "adapter"
CT_GROUP_SIZES = (128, 64, 32, 16, 8)  # fallbacks for ragged groups, largest first


def ct_problem(spec: QuantSpec, in_features: int) -> str | None:
    """Why compressed-tensors (as vLLM serves it) cannot hold Q of this spec as is, or None if it can."""
    if spec.kind == "fp":
        if spec.format != "fp8_e4m3":
            return f"{spec.format} has no compressed-tensors layout"
        return None if spec.group_size is None else "FP8 is exported per-channel only"
    if spec.kind != "int":  # NormalFloat and any other codebook family
        return f"{spec.format} (a {spec.kind} codebook) has no compressed-tensors layout"
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


def write_ct(model: nn.Module, tmp: Path, dtype: torch.dtype, tokenizer, name: str) -> None:
    """Write the prepared `model` (every QLinear expressible) as compressed-tensors (+ adapter/) in `tmp`."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    state = dense_state(model, dtype, set(layers))
    groups: dict[str, list[str]] = {}
    for n, m in layers.items():
        tensors, args, fmt = _ct_layer(n, m, dtype)
        state.update(tensors)
        if m.bias is not None:
            state[f"{n}.bias"] = m.bias.detach().to(dtype).contiguous()
        groups.setdefault(json.dumps([args, fmt]), []).append(n)
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    write_model(tmp, state, model.config, dtype, _ct_config(groups, ignore))
    adapter = _adapter(layers, dtype)
    if adapter is not None:
        (tmp / ADAPTER_DIR).mkdir()
        (tmp / ADAPTER_DIR / "adapter_config.json").write_text(json.dumps(adapter[0], indent=2) + "\n")
        save_file(adapter[1], str(tmp / ADAPTER_DIR / "adapter_model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def _needs_decompression(path: Path) -> bool:
    """Whether `path` is a compressed-tensors folder with asymmetric pack-quantized layers, which
    transformers 5 cannot load compressed (it builds their zero points unpacked; lowbit, like
    compressed-tensors' own compressor, stores them packed, which is what vLLM reads)."""
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        return False
    groups = (qc.get("config_groups") or {}).values()
    packed = [g for g in groups if (g.get("format") or qc.get("format")) == "pack-quantized"]
    return any((g.get("weights") or {}).get("symmetric") is False for g in packed)


def _load_decompressed(path: Path, model: str, dtype: torch.dtype) -> torch.nn.Module:
    """A compressed-tensors folder as a plain dense model, each quantized layer decompressed by
    compressed-tensors with its own config group's scheme. (transformers' `CompressedTensorsConfig(
    dequantize=True)` decodes every layer with the first group's scheme, so mixed exports fail there.)"""
    return call_loader(model, "decompress", lambda: _decompressed(path, model, dtype))


def _decompressed(path: Path, model: str, dtype: torch.dtype) -> torch.nn.Module:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(path)
    qc = config.quantization_config
    del config.quantization_config
    state = {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}
    for group in qc["config_groups"].values():
        scheme = QuantizationScheme.model_validate(group)
        compressor = BaseCompressor.get_value_from_registry(group.get("format") or qc["format"])
        for name in group["targets"]:  # lowbit targets layers by exact name
            layer = {k[len(name) + 1 :]: state.pop(k) for k in list(state) if k.startswith(f"{name}.weight")}
            if "weight_scale" not in layer:
                raise ModelError(
                    f"cannot load {model!r}: no quantized tensors for config group target {name}"
                )
            state[f"{name}.weight"] = compressor.decompress(layer, scheme)["weight"]
    net = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = net.load_state_dict(state, strict=False)
    params = net.state_dict(keep_vars=True)
    loaded = {params[k].data_ptr() for k in state if k in params}
    lost = [k for k in missing if params[k].data_ptr() not in loaded]  # tied copies are not lost
    if lost or unexpected:
        raise ModelError(f"cannot load {model!r}: missing {lost[:5]}, unexpected {unexpected[:5]}")
    return net.eval()


def _attach_adapter(net: torch.nn.Module, adapter: Path, model: str) -> torch.nn.Module:
    """Wrap `net` with the PEFT LoRA adapter that `lowbit export --to compressed-tensors` writes
    beside the quantized base (the low-rank part L1 L2 of each layer)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelError(f"{model!r} has a LoRA adapter; install peft to load it") from None
    with torch.no_grad():  # one forward decompresses compressed-tensors layers so PEFT can wrap them
        net(torch.zeros(1, 1, dtype=torch.long))
    attach = lambda: PeftModel.from_pretrained(net, str(adapter))  # noqa: E731
    return call_loader(model, "attach the adapter of", attach).eval()


def is_ct(path: Path) -> bool:
    """Whether `path` is a transformers folder whose quantization_config is compressed-tensors."""
    try:
        qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def reload_ct(path: Path, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """A compressed-tensors folder as transformers loads it (decompressed layer by layer where it must
    be), the PEFT adapter in `adapter/` attached."""
    model = str(path)
    if _needs_decompression(path):
        net, tokenizer = _load_decompressed(path, model, dtype), hf_tokenizer(model, model)
    else:
        net, tokenizer = from_pretrained(model, model, dtype)
    if (path / ADAPTER_DIR / "adapter_config.json").is_file():
        net = _attach_adapter(net, path / ADAPTER_DIR, model)
    return net, tokenizer


CT = Target(
    "compressed-tensors",
    write=write_ct,
    detect=is_ct,
    reload=reload_ct,
    stored_bits=lambda path, net: safetensors_bits(path, net, ADAPTER_DIR),
    problem=ct_problem,
    nearest=ct_spec,
    decoded=_ct_weight,
)
