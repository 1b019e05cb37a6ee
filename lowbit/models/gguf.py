"""GGUF files as source models: dequantized at load time into a plain dense transformers model.

Weights of any GGUF type are dequantized by transformers' GGUF loader into ordinary `nn.Linear` layers (no
quantization config left); the tokenizer stored in the file is converted to a transformers tokenizer.
Converting a tokenizer takes seconds, so each file's is built once per process.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers

from lowbit.models.errors import call_loader


def load_gguf(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A GGUF file dequantized into a plain dense model (no GGUF modules, no quantization config)."""
    config = transformers.GgufConfig(dequantize=True)
    model = call_loader(
        str(path),
        "load GGUF model",
        lambda: transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, quantization_config=config
        ),
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model.eval()


@functools.lru_cache(maxsize=4)
def gguf_tokenizer(path: str):
    """The tokenizer stored in a GGUF file; converting it takes seconds, so it is built once per file."""
    p = Path(path)
    return call_loader(
        path,
        "load GGUF tokenizer",
        lambda: transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name),
    )
