"""GGUF files as source models: dequantized at load time into a plain dense transformers model.

Weights of any GGUF type are dequantized by transformers' GGUF loader into ordinary `nn.Linear` layers (no
quantization config left); the tokenizer stored in the file is converted to a transformers tokenizer.
Converting a tokenizer takes seconds, so each file's is built once per process.
"""

from __future__ import annotations

import functools
from pathlib import Path

import gguf
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


# llama.cpp pre-tokenizers (`tokenizer.ggml.pre`) that split every digit off before the byte-level
# regex (llama-vocab.cpp: "\\p{N}" first), which transformers' GGUF converter reads as plain GPT-2.
DIGIT_SPLIT = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


@functools.lru_cache(maxsize=4)
def gguf_tokenizer(path: str):
    """The tokenizer stored in a GGUF file; converting it takes seconds, so it is built once per file.

    Where the file's pre-tokenizer splits digits one by one (DIGIT_SPLIT, e.g. SmolLM2's "smollm"), the
    same split (tokenizers' Digits(individual_digits)) goes before transformers' byte-level one, so that
    ids equal llama.cpp's where whitespace precedes digits ("a 123" -> "a", " ", "1", "2", "3", as the
    original Hugging Face tokenizer.json of SmolLM2 splits too)."""
    p = Path(path)
    tok = call_loader(
        path,
        "load GGUF tokenizer",
        lambda: transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name),
    )
    field = gguf.GGUFReader(p).fields.get("tokenizer.ggml.pre")
    if field is not None and field.contents() in DIGIT_SPLIT:
        from tokenizers import pre_tokenizers

        backend = tok.backend_tokenizer
        split = pre_tokenizers.Digits(individual_digits=True)
        backend.pre_tokenizer = pre_tokenizers.Sequence([split, backend.pre_tokenizer])
    return tok
