"""Sharded safetensors: files written tensor by tensor, shards of a bounded size, and reading them back.

A checkpoint's tensors live in `model.safetensors` when they fit one shard, else in
`model-0000k-of-0000n.safetensors` beside `model.safetensors.index.json` (transformers' layout: the index
maps every tensor name to its shard). `write_safetensors` writes one file from a layout (name -> dtype,
shape) and a function giving each tensor when its turn comes, so a shard never needs all its tensors in
memory at once. `finish_shards` gives numbered shards their final names once their count n is known (it
is known only at the end of a streamed job) and writes the index. `weight_files` and `read_headers` read
either layout.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from lowbit.nn.manifest import WEIGHTS, CheckpointError, read_json, read_safetensors_header
from lowbit.nn.manifest import WEIGHTS_INDEX as INDEX

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default shard size ("5GB")
# safetensors dtype names (as its header spells them) -> torch dtypes
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # tensor name -> (dtype, shape), in file order


def parse_size(size: int | str, what: str = "shard size") -> int:
    """Bytes from an int or a size such as "5GB", "500MB", "2GiB" (decimal and binary units); `what` names
    the setting in the error."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = str(size).strip().upper()
    number = text.rstrip("KMGIB")
    try:
        n = int(float(number) * units[text[len(number) :]])
    except (KeyError, ValueError):
        n = 0
    if n < 1:
        raise CheckpointError(f"{what} must be a positive size such as 2GB or 500MB, got {size!r}")
    return n


def shard_name(k: int, n: int) -> str:
    """The file name of shard k (1-based) of n."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def nbytes(layout: Layout) -> int:
    return sum(dtype.itemsize * torch.Size(shape).numel() for dtype, shape in layout.values())


def write_safetensors(
    path: Path, layout: Layout, tensor: Callable[[str], torch.Tensor], metadata: dict | None = None
) -> None:
    """Write a safetensors file holding the tensors of `layout`, in its order, each asked of `tensor(name)`
    only when its bytes are written (at most one tensor in memory here). Written under a temporary name and
    renamed, so `path` is whole or absent."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, (dtype, shape) in layout.items():
        size = dtype.itemsize * torch.Size(shape).numel()
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            for name, (dtype, shape) in layout.items():
                t = tensor(name).detach()
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise CheckpointError(f"tensor {name} is {tuple(t.shape)} {t.dtype}, not {shape} {dtype}")
                f.write(memoryview(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def layout_of(tensors: dict[str, torch.Tensor]) -> Layout:
    return {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}


def split_layout(layout: Layout, max_bytes: int) -> list[Layout]:
    """Consecutive groups of `layout` of at most max_bytes each (a larger tensor alone in its group)."""
    groups: list[Layout] = [{}]
    size = 0
    for name, entry in layout.items():
        n = nbytes({name: entry})
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = entry
        size += n
    return groups


def finish_shards(shards: list[Path], folder: Path) -> list[str]:
    """Move the numbered shard files (in order) into `folder` under their final names: `model.safetensors`
    when there is one, else `model-0000k-of-0000n.safetensors` and the index. Returns the names written."""
    if len(shards) == 1:
        shutil.move(shards[0], folder / WEIGHTS)
        return [WEIGHTS]
    names, weight_map, total = [], {}, 0
    for k, src in enumerate(shards, 1):
        name = shard_name(k, len(shards))
        header = read_safetensors_header(src)
        for key, v in header.items():
            if key != "__metadata__":
                weight_map[key] = name
                total += v["data_offsets"][1] - v["data_offsets"][0]
        shutil.move(src, folder / name)
        names.append(name)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: those its index names, else model.safetensors (or none)."""
    index = folder / INDEX
    if index.is_file():
        weight_map = read_json(index, f"{INDEX} in {folder}")
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
            raise CheckpointError(f"{INDEX} in {folder} has no weight_map")
        names = sorted(set(weight_map["weight_map"].values()))
        if any(not isinstance(n, str) or "/" in n or "\\" in n or n.startswith(".") for n in names):
            raise CheckpointError(f"{INDEX} in {folder} names a bad shard file")
        return [folder / n for n in names]
    single = folder / WEIGHTS
    return [single] if single.is_file() else []


def read_headers(folder: Path) -> dict[str, tuple[Path, dict]]:
    """{tensor name: (its file, its header entry)} over every safetensors file of the folder, each file's
    header checked against its size; a name in two files, or one the index puts elsewhere, is refused."""
    files = weight_files(folder)
    if not files:
        raise CheckpointError(f"checkpoint file {WEIGHTS} (or {INDEX}) is missing from {folder}")
    index = folder / INDEX
    weight_map = read_json(index, INDEX)["weight_map"] if index.is_file() else None
    out: dict[str, tuple[Path, dict]] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f.name} is missing from {folder}")
        for name, v in read_safetensors_header(f).items():
            if name == "__metadata__":
                continue
            if name in out or (weight_map is not None and weight_map.get(name) != f.name):
                raise CheckpointError(f"tensor {name} of {f.name} does not match {INDEX}")
            out[name] = (f, v)
    if weight_map is not None and set(weight_map) != set(out):
        raise CheckpointError(f"{INDEX} names tensors that no shard holds")
    return out
