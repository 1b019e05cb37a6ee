"""Files every safetensors export shares: the dense part of the state, config.json, and the stored-bits count.

`safetensors_bits` counts what a safetensors export stores per quantized layer, over its weights:

- quantized layers (compressed-tensors: those with a `weight_scale`): every `{layer}.weight*` tensor
  (`weight_packed`, `weight_scale`, `weight_zero_point`, or FP8 `weight` and its scale) but
  `weight_shape` (16 bytes of shape metadata), plus that layer's `lora_A` / `lora_B` in the PEFT adapter
  folder, over N K per layer (from `weight_shape`, or `weight`'s shape);
- with no quantized layer (a dense export, a plain transformers folder): every linear layer's weight at
  its stored dtype.
Biases are not counted, as in `lowbit info`.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.nn.manifest import read_safetensors_header

PEFT_PREFIX = "base_model.model."


def dense_state(model: nn.Module, dtype: torch.dtype, skip: set[str]) -> dict[str, torch.Tensor]:
    """The state dict without the modules in `skip` and without tied copies, floating tensors in `dtype`."""
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        if name.rpartition(".")[0] in skip:
            continue
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if t.numel() and key in seen:  # a tied copy: readers re-tie it on load
            continue
        seen.add(key)
        state[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous().cpu()
    return state


def write_model(tmp: Path, state: dict, config, dtype: torch.dtype, quant_config: dict | None) -> None:
    """model.safetensors + config.json (the model's config, its quantization_config replaced)."""
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if quant_config is not None:
        config.quantization_config = quant_config
    config.dtype = dtype
    config.save_pretrained(tmp)


def _layer(key: str) -> str:
    """The layer a stored tensor belongs to: `{layer}.weight_packed` and PEFT's
    `base_model.model.{layer}.lora_A.weight` -> `{layer}`."""
    if key.startswith(PEFT_PREFIX) and ".lora_" in key:
        return key.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0]
    return key.rsplit(".", 1)[0]


def safetensors_bits(path: Path, net: nn.Module, adapter_dir: str | None = None) -> float | None:
    files = sorted(path.glob("*.safetensors"))
    files += sorted((path / adapter_dir).glob("*.safetensors")) if adapter_dir else []
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
