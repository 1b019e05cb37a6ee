"""A source model's shapes without its weights: the config, a skeleton on the meta device, stored sizes.

`source_shapes(model)` accepts what `load_model` accepts and reads only config.json (or a GGUF file's
metadata) and the safetensors headers, never a weight: a plan for a 405B model is made in a second. The
skeleton is the transformers model built from the config on the meta device, in the dtype `load_model`
would load it in, so its module names and parameter shapes are exactly those of the loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from lowbit.models.errors import ModelError, call_loader
from lowbit.models.folder import config_dtype, stored_dtype, weight_files
from lowbit.models.source import locate
from lowbit.nn.manifest import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class SourceShapes:
    """skeleton: the model on the meta device; dtype: what `load_model(model)` loads floating tensors in;
    stored_bytes: bytes of the weights on disk (safetensors tensors, or the GGUF file);
    tokenizer_bytes: bytes of the tokenizer files a checkpoint copies (0 when unknown);
    mapped_bytes: bytes the loader keeps memory-mapped while loading: 0 for a folder that
    `lowbit.models.folder` reads tensor by tensor, else the stored bytes; direct: the source is such a
    folder (which `lowbit.compress` can stream block by block)."""

    skeleton: torch.nn.Module
    dtype: torch.dtype
    stored_bytes: int
    tokenizer_bytes: int
    mapped_bytes: int
    direct: bool = False


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
        dtype, stored = config_dtype(config), 0
        if kind == "folder":
            try:
                dtype, stored = stored_dtype(Path(where), config)
            except CheckpointError as e:
                raise ModelError(str(e)) from None
        tok = sum((Path(where) / f).stat().st_size for f in TOKENIZER_FILES if (Path(where) / f).is_file())
    with torch.device("meta"):
        skeleton = call_loader(
            model,
            "build the model of",
            lambda: transformers.AutoModelForCausalLM.from_config(config, dtype=dtype),
        )
    quantized = hasattr(config, "quantization_config")
    direct = kind == "folder" and bool(weight_files(Path(where))) and not quantized
    return SourceShapes(skeleton.eval(), dtype, stored, tok, 0 if direct else stored, direct)
