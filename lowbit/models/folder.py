"""Reading a local safetensors folder tensor by tensor into a skeleton, with no second copy of the weights.

transformers' `from_pretrained` reads the shards memory-mapped; the pages it has read count as resident
memory until loading ends, so a bf16 model loaded in bf16 peaks near twice its size (measured on the
0.5B shape of `scripts/bench_scale.py`). Here the model is built from its config on the meta device
(non-persistent buffers such as rotary frequencies stay real), and each tensor is read with one
`readinto` straight into its own storage, cast to the load dtype when it differs, and assigned: the peak
is the model plus one tensor. Folders this cannot read exactly as transformers would (no safetensors
files, a quantization config, tensor names that transformers renames or fuses on load) return None, and
the caller falls back to `from_pretrained`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from lowbit.nn.manifest import CheckpointError, read_safetensors_header

# safetensors dtype names -> torch dtypes (the header spells dtypes this way)
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors shards: those its index names, else model.safetensors (or none)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def load_safetensors_folder(folder: Path, config, dtype: torch.dtype) -> torch.nn.Module | None:
    """The model of `folder` with its weights read tensor by tensor, floating ones in `dtype`; None when
    the folder is not one this reader takes exactly (see the module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    files = weight_files(folder)
    if not files or getattr(config, "quantization_config", None) is not None:
        return None
    headers = {}
    for f in files:
        try:
            headers[f] = {k: v for k, v in read_safetensors_header(f).items() if k != "__metadata__"}
        except (CheckpointError, OSError):
            return None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    expected = set(model.state_dict())
    stored = {k for h in headers.values() for k in h}
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tied -= {n for n, _ in model.named_parameters()}
    if (
        not stored <= expected
        or expected - stored - tied
        or any(v["dtype"] not in DTYPES for h in headers.values() for v in h.values())
    ):
        return None
    for f, header in headers.items():
        model.load_state_dict(_read_tensors(f, header, dtype), strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def _read_tensors(path: Path, header: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, each read into its own storage (floating ones cast)."""
    out = {}
    with open(path, "rb", buffering=0) as f:
        start = 8 + int.from_bytes(f.read(8), "little")
        for name, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            t = torch.empty(v["shape"], dtype=DTYPES[v["dtype"]])
            f.seek(start + v["data_offsets"][0])
            _read_into(f, memoryview(t.view(-1).view(torch.uint8).numpy()), path)
            out[name] = t.to(dtype) if t.is_floating_point() else t
    return out


def _read_into(f, buf: memoryview, path: Path) -> None:
    """Fill `buf` from `f` (one read returns at most ~2 GB on Linux, so loop)."""
    done = 0
    while done < len(buf):
        n = f.readinto(buf[done:])
        if not n:
            raise CheckpointError(f"{path.name} ended before its tensors did")
        done += n


def stored_dtype(folder: Path, config) -> tuple[torch.dtype, int]:
    """(the floating dtype holding most bytes, total tensor bytes) over the folder's safetensors headers;
    the config's dtype (else fp32) when the folder has no safetensors file."""
    by_dtype, total = Counter(), 0
    for f in sorted(folder.glob("*.safetensors")):
        for name, v in read_safetensors_header(f).items():
            if name == "__metadata__":
                continue
            nbytes = v["data_offsets"][1] - v["data_offsets"][0]
            total += nbytes
            if DTYPES.get(v["dtype"], torch.int8).is_floating_point:
                by_dtype[DTYPES[v["dtype"]]] += nbytes
    return (by_dtype.most_common(1)[0][0] if by_dtype else config_dtype(config)), total


def config_dtype(config) -> torch.dtype:
    """The dtype a transformers config names (fp32 when it names none)."""
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype
