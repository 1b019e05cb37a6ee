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

from collections import Counter
from pathlib import Path

import torch

from lowbit.nn.manifest import CheckpointError, read_safetensors_header
from lowbit.nn.shards import DTYPES, weight_files


def load_safetensors_folder(folder: Path, config, dtype: torch.dtype) -> torch.nn.Module | None:
    """The model of `folder` with its weights read tensor by tensor, floating ones in `dtype`; None when
    the folder is not one this reader takes exactly (see the module docstring)."""
    found = folder_skeleton(folder, config, dtype)
    if found is None:
        return None
    model, headers = found
    by_file: dict[Path, dict] = {}
    for name, (f, v) in headers.items():
        by_file.setdefault(f, {})[name] = v
    for f, header in by_file.items():
        model.load_state_dict(read_tensors(f, header, dtype), strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def folder_skeleton(folder: Path, config, dtype: torch.dtype) -> tuple[torch.nn.Module, dict] | None:
    """(the model built from `config` on the meta device in `dtype`, tied as configured, non-persistent
    buffers real; {tensor name: (its file, header entry)}), or None when the folder is not one this
    reader takes exactly (see the module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        files = weight_files(folder)
    except CheckpointError:
        return None
    if not files or getattr(config, "quantization_config", None) is not None:
        return None
    headers = {}
    for f in files:
        try:
            header = read_safetensors_header(f)
        except (CheckpointError, OSError):
            return None
        headers.update({k: (f, v) for k, v in header.items() if k != "__metadata__"})
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    expected = set(model.state_dict())
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tied -= {n for n, _ in model.named_parameters()}
    if (
        not set(headers) <= expected
        or expected - set(headers) - tied
        or any(v["dtype"] not in DTYPES for _, v in headers.values())
    ):
        return None
    return model, headers


def read_tensors(
    path: Path, header: dict, dtype: torch.dtype | None, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The tensors of `header` (entries of one safetensors file), each read into its own storage (floating
    ones cast to dtype unless it is None) and moved to device. Nothing stays memory-mapped, so the pages
    read do not count as resident memory afterwards."""
    out = {}
    with open(path, "rb", buffering=0) as f:
        start = 8 + int.from_bytes(f.read(8), "little")
        for name, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            t = torch.empty(v["shape"], dtype=DTYPES[v["dtype"]])
            f.seek(start + v["data_offsets"][0])
            _read_into(f, memoryview(t.view(-1).view(torch.uint8).numpy()), path)
            out[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).to(device)
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
