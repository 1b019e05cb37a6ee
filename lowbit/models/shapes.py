"""A source model's shapes without its weights: the config, a skeleton on the meta device, stored sizes.

`source_shapes(model)` accepts what `load_model` accepts and reads only config.json (or a GGUF file's
metadata) and the safetensors headers, never a weight: a plan for a 405B model is made in a second. The
skeleton is the transformers model built from the config on the meta device, in the dtype `load_model`
would load it in, so its module names and parameter shapes are exactly those of the loaded model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from lowbit.models.errors import ModelError, call_loader
from lowbit.models.source import locate
from lowbit.nn.manifest import CheckpointError, read_safetensors_header

# safetensors dtype names of floating tensors (the header spells dtypes this way)
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class SourceShapes:
    """skeleton: the model on the meta device; dtype: what `load_model(model)` loads floating tensors in;
    stored_bytes: bytes of the weights on disk (safetensors tensors, or the GGUF file);
    tokenizer_bytes: bytes of the tokenizer files a checkpoint copies (0 when unknown)."""

    skeleton: torch.nn.Module
    dtype: torch.dtype
    stored_bytes: int
    tokenizer_bytes: int


def source_shapes(model: str) -> SourceShapes:
    """The skeleton, load dtype and stored sizes of `model` (a built-in name, folder, .gguf or hub id)."""
    kind, where = locate(model)
    if kind in ("builtin", "gguf"):
        config = call_loader(
            model,
            "read the GGUF metadata of",
            lambda: transformers.AutoConfig.from_pretrained(str(where.parent), gguf_file=where.name),
        )
        dtype, stored, tok = torch.float32, where.stat().st_size, 0
    else:
        auto_config = transformers.AutoConfig
        config = call_loader(model, "read the config of", lambda: auto_config.from_pretrained(where))
        dtype, stored = stored_dtype(Path(where), config) if kind == "folder" else (_config_dtype(config), 0)
        tok = sum((Path(where) / f).stat().st_size for f in TOKENIZER_FILES if (Path(where) / f).is_file())
    with torch.device("meta"):
        skeleton = call_loader(
            model,
            "build the model of",
            lambda: transformers.AutoModelForCausalLM.from_config(config, dtype=dtype),
        )
    return SourceShapes(skeleton.eval(), dtype, stored, tok)


def stored_dtype(folder: Path, config) -> tuple[torch.dtype, int]:
    """(the floating dtype holding most bytes, total tensor bytes) over the folder's safetensors headers;
    the config's dtype when the folder has no safetensors file."""
    files = sorted(folder.glob("*.safetensors"))
    by_dtype, total = Counter(), 0
    for f in files:
        try:
            header = read_safetensors_header(f)
        except CheckpointError as e:
            raise ModelError(str(e)) from None
        for name, v in header.items():
            if name == "__metadata__":
                continue
            nbytes = v["data_offsets"][1] - v["data_offsets"][0]
            total += nbytes
            if v["dtype"] in FLOAT_DTYPES:
                by_dtype[FLOAT_DTYPES[v["dtype"]]] += nbytes
    if not by_dtype:
        return _config_dtype(config), total
    return by_dtype.most_common(1)[0][0], total


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype
