"""Bits per weight of a model as its files store it: what `lowbit eval` reports for an export.

`lowbit info` counts a checkpoint's codes, scales, zeros, low-rank factors and smoothing per quantized
layer, over the quantized layers' weights. The same count for the other things `lowbit eval` loads, read
from their files (the model in memory is dense, 32 or 16 bits whatever it came from):

- a folder with safetensors, quantized (compressed-tensors: the layers with a `weight_scale`): every
  `{layer}.weight*` tensor (`weight_packed`, `weight_scale`, `weight_zero_point`, or FP8 `weight` and its
  scale) but `weight_shape` (16 bytes of shape metadata), plus that layer's `lora_A` / `lora_B` in
  `adapter/adapter_model.safetensors`, over N K per layer (from `weight_shape`, or `weight`'s shape);
- a GGUF file, or a folder of them: every tensor of a block-quantized type (the blocks hold the scales and
  mins) plus its `.lora_a` / `.lora_b` in an adapter file beside it, over their weights;
- with no quantized layer (a dense export, a plain transformers folder, an unquantized GGUF): every
  linear layer's weight (in GGUF: every 2-D tensor but the token embeddings) at its stored dtype.
Biases are not counted, as in `lowbit info`. `plan_bits` counts the same for the quantized layers of a
model in memory, from their QLinear tensors.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
from safetensors import safe_open
from torch import nn

from lowbit.compress.ct_export import ADAPTER_DIR
from lowbit.compress.manifest import read_safetensors_header

Q = gguf.GGMLQuantizationType
UNQUANTIZED = {Q.F32, Q.F16, Q.BF16, Q.F64, Q.I8, Q.I16, Q.I32, Q.I64}
PEFT_PREFIX = "base_model.model."


def stored_bits_per_weight(target: str, net: nn.Module) -> float | None:
    """Bits per weight of the local folder or .gguf file `target` as stored (see the module docstring);
    None for anything else (a hub id, a built-in name) or when no weight is found. `net` is the model
    loaded from it, which names the linear layers of a dense folder."""
    path = Path(target).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_bits([path])
    if not path.is_dir():
        return None
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return _safetensors_bits(path, net)
    ggufs = sorted(path.glob("*.gguf"))
    return _gguf_bits(ggufs) if ggufs else None


def _layer(key: str) -> str:
    """The layer a stored tensor belongs to: `{layer}.weight_packed` and PEFT's
    `base_model.model.{layer}.lora_A.weight` -> `{layer}`."""
    if key.startswith(PEFT_PREFIX) and ".lora_" in key:
        return key.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0]
    return key.rsplit(".", 1)[0]


def _safetensors_bits(path: Path, net: nn.Module) -> float | None:
    files = sorted(path.glob("*.safetensors")) + sorted((path / ADAPTER_DIR).glob("*.safetensors"))
    headers = {f: read_safetensors_header(f) for f in files}
    info = {k: v for h in headers.values() for k, v in h.items() if k != "__metadata__"}
    quantized = {_layer(k) for k in info if k.endswith(".weight_scale")}
    if quantized:
        weights = {n: math.prod(info[f"{n}.weight"]["shape"]) for n in quantized if f"{n}.weight" in info}
        for f, h in headers.items():  # pack-quantized layers keep (N, K) in weight_shape
            with safe_open(str(f), framework="pt") as tensors:
                for k in (k for k in h if k.endswith(".weight_shape") and _layer(k) in quantized):
                    weights[_layer(k)] = math.prod(tensors.get_tensor(k).tolist())
    else:
        linears = (n for n, m in net.named_modules() if isinstance(m, nn.Linear))
        weights = {n: math.prod(info[f"{n}.weight"]["shape"]) for n in linears if f"{n}.weight" in info}
    counted = [
        v["data_offsets"][1] - v["data_offsets"][0]
        for k, v in info.items()
        if _layer(k) in weights and not k.endswith((".bias", ".weight_shape"))
    ]
    return 8 * sum(counted) / sum(weights.values()) if weights else None


def _gguf_bits(files: list[Path]) -> float | None:
    tensors = {t.name: t for f in files for t in gguf.GGUFReader(f).tensors}
    lora = {n for n in tensors if n.endswith((".lora_a", ".lora_b"))}
    layers = {n for n, t in tensors.items() if t.tensor_type not in UNQUANTIZED and n not in lora}
    if not layers:
        layers = {
            n for n, t in tensors.items() if len(t.shape) == 2 and n not in lora | {"token_embd.weight"}
        }
    bits = sum(
        8 * int(t.n_bytes) for n, t in tensors.items() if n in layers or n.rpartition(".")[0] in layers
    )
    weights = sum(int(tensors[n].n_elements) for n in layers)
    return bits / weights if weights else None


def plan_bits(model: nn.Module, plan: dict[str, dict]) -> int:
    """Exact storage bits of the quantized layers: codes, scales, zeros, low-rank factors, smoothing."""
    total = 0
    for name in plan:
        m = model.get_submodule(name)
        total += sum(t.numel() * t.element_size() * 8 for n, t in m.state_dict().items() if n != "bias")
    return total
