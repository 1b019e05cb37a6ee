"""The compressed-tensors export (served by vLLM and SGLang) and its PEFT LoRA adapter.

Each quantized layer's base Q goes in the layout of the compressed-tensors library, packed by its own
`pack_to_int32` and described by its own QuantizationArgs / QuantizationScheme / QuantizationConfig:
INT4 / INT8 as `pack-quantized` (`weight_packed` int32 [N, ceil(K b / 32)], the codes' bit stream;
`weight_scale` [N, G]; `weight_zero_point` int32 [ceil(N b / 32), G] packed along the rows, asymmetric
only; `weight_shape` [2]), FP8 E4M3 per-channel as `float-quantized` (`weight` float8_e4m3fn [N, K],
`weight_scale` [N, 1]). A group size that does not divide K (a shorter last group) is written exactly at
the group gcd(g, K), each group's scale and zero repeated (`ct_group`). The low-rank branch L1 L2 goes
to `adapter/`, a PEFT LoRA adapter (lora_B = L1, lora_A = L2, lora_alpha = r: scaling 1). What the
layout cannot hold is refused or converted by `lowbit.export.fit`. `reload_ct` loads such a folder back
as transformers (+ PEFT) computes it.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from safetensors.torch import save_file
from torch import nn

from lowbit.export.files import dense_state, safetensors_bits, write_model
from lowbit.export.target import Target
from lowbit.models.errors import ModelError, call_loader
from lowbit.models.source import from_pretrained, hf_tokenizer
from lowbit.nn.qlinear import QLinear
from lowbit.quantizers import QuantSpec, decode_scales, expand_groups, unpack_codes
from lowbit.quantizers.engines import vllm_problem

if TYPE_CHECKING:  # compressed-tensors imports triton: loaded only when an export is written or read
    from compressed_tensors.quantization import QuantizationArgs

ADAPTER_DIR = "adapter"


def ct_group(spec: QuantSpec, in_features: int) -> int | None:
    """The group size Q of this spec is written with: its own when it divides K (None: per channel), else
    gcd(g, K), a divisor of both, each of Q's groups (the last one shorter) being g / gcd of these that
    repeat its scale and zero: exact, nothing re-quantized (g128 on K = 576 -> g64)."""
    g = spec.group_size
    return g if g is None or in_features % g == 0 else math.gcd(g, in_features)


def ct_problem(spec: QuantSpec, in_features: int) -> str | None:
    """Why compressed-tensors (as vLLM serves it) cannot hold Q of this spec as is, or None if it can:
    vLLM's formats (`lowbit.quantizers.engines.vllm_problem`), any integer group size (see ct_group),
    double-quantized scales decoded to the export dtype."""
    flat = replace(spec, double_quant=False, group_size=None if spec.kind == "int" else spec.group_size)
    return vllm_problem(flat, None)


def ct_spec(spec: QuantSpec, in_features: int, dtype: torch.dtype) -> QuantSpec:
    """The nearest spec compressed-tensors can hold: INT4 (NF, FP4, INT2/3), symmetric INT8, FP8 E4M3
    per-channel, the group size kept; scales stored in the export dtype."""
    scale_dtype = str(dtype).removeprefix("torch.")
    if spec.kind == "fp" and spec.bits == 8:
        return QuantSpec("fp8_e4m3", None, True, scale_dtype)
    bits = 8 if spec.format == "int8" else 4
    return QuantSpec(f"int{bits}", spec.group_size, spec.symmetric or bits == 8, scale_dtype)


def _ct_values(m: QLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes uint8 [N, K], grid values float32 [N, K]: c - z, c - 2^(b-1) or the FP8 value,
    scales float32 [N, G'], zeros float32 [N, G'] or None), G' the groups of `ct_group`."""
    q = m.qtensor()
    codes, (s, z) = unpack_codes(q), decode_scales(q)
    K, gs = m.in_features, m.spec.group_size or m.in_features
    d = ct_group(m.spec, K) or K
    s, z = (None if t is None else t.repeat_interleave(gs // d, dim=1)[:, : K // d] for t in (s, z))
    if m.spec.kind == "fp":
        return codes, codes.view(torch.float8_e4m3fn).float(), s, z
    return codes, codes.float() - (2.0 ** (m.spec.bits - 1) if z is None else expand_groups(z, K, d)), s, z


def _ct_weight(m: QLinear, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as compressed-tensors decodes it: grid value * scale, both in `dtype` (float32 out)."""
    _, v, s, _ = _ct_values(m)
    s = expand_groups(s, m.in_features, ct_group(m.spec, m.in_features) or m.in_features)
    return (v.to(dtype) * s.to(dtype)).float()


def _signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' int8 quantized values q = c - 2^(b-1) of unsigned codes c (what it packs)."""
    return (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


def _ct_layer(
    fqn: str, m: QLinear, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], QuantizationArgs, str]:
    """(tensors by name, compressed-tensors weight args, format) of one quantized layer, packed by
    compressed-tensors' own `pack_to_int32` (codes along K; zero points along N, its packed_dim=0)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationArgs

    N, K = m.out_features, m.in_features
    codes, _, s, z = _ct_values(m)
    spec, group = m.spec, ct_group(m.spec, K)
    t = {f"{fqn}.weight_scale": s.to(dtype).contiguous()}
    if spec.kind == "fp":
        t[f"{fqn}.weight"] = codes.view(torch.float8_e4m3fn)
        args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
        return t, args, CompressionFormat.float_quantized.value
    strategy = "group" if group else "channel"
    args = QuantizationArgs(
        num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy=strategy, group_size=group
    )
    t[f"{fqn}.weight_packed"] = pack_to_int32(_signed(codes, spec.bits), spec.bits)
    t[f"{fqn}.weight_shape"] = torch.tensor([N, K], dtype=torch.int64)
    if z is not None:
        zp = _signed(z.round().to(torch.uint8), spec.bits)  # [N, G']
        t[f"{fqn}.weight_zero_point"] = pack_to_int32(zp, spec.bits, packed_dim=0)
    return t, args, CompressionFormat.pack_quantized.value


def _ct_config(groups: dict[str, list], ignore: list[str]) -> dict:
    """config.json's quantization_config, a compressed-tensors QuantizationConfig as its ModelCompressor
    writes it: one config group per distinct scheme, targeting its layers by exact name; the format per
    group ("mixed-precision" on top when they differ)."""
    import compressed_tensors
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    schemes = {}
    for i, (key, names) in enumerate(groups.items()):
        args, fmt = json.loads(key)
        weights = QuantizationArgs.model_validate(args)
        schemes[f"group_{i}"] = QuantizationScheme(targets=names, weights=weights, format=fmt)
    formats = {g.format for g in schemes.values()}
    fmt = formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value
    qc = QuantizationConfig(
        config_groups=schemes, format=fmt, quantization_status="compressed", ignore=ignore
    )
    head = {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors"}
    return {
        **head,
        "sparsity_config": {},
        "transform_config": {},
        **qc.model_dump(mode="json", exclude={"quant_method"}),
    }


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
        groups.setdefault(json.dumps([args.model_dump(mode="json"), fmt]), []).append(n)
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
