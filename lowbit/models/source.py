"""Loading the model to compress: a built-in name, a local HF folder, a local .gguf file or a hub id.

`load_model(model)` returns (model in eval mode, tokenizer) with plain dense `nn.Linear` layers:

- a built-in name (`lowbit.models.builtin`): its GGUF file, dequantized;
- a local folder with `config.json`: through transformers' Auto classes (quantized folders that
  transformers can load, e.g. compressed-tensors, load as transformers builds them);
- a local `.gguf` file, or a folder holding exactly one: dequantized (`lowbit.models.gguf`);
- anything else that looks like a hub id (`owner/name`): `from_pretrained` from the hub.
Floating tensors keep the source's dtype (a bf16 folder loads in bf16, not fp32: half the memory; the
compress stages compute in fp32 per layer where they need it) unless `dtype` is given; GGUF weights are
dequantized into fp32. A local path that does not exist is refused at once, without trying the hub
(`check_model` runs these checks without loading anything): a path-looking name, an `owner/name` whose
first part is a local folder, or a near miss of a built-in name. A
lowbit checkpoint folder is refused here: `lowbit.load` loads it; the outputs of `lowbit export` are
reloaded by their target (`lowbit.export`).
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path

import torch
import transformers

from lowbit.models.builtin import BUILTIN_MODELS, builtin_model, builtin_path
from lowbit.models.errors import ModelError, call_loader
from lowbit.models.folder import folder_skeleton, load_safetensors_folder, stored_dtype
from lowbit.models.gguf import gguf_tokenizer, load_gguf
from lowbit.nn.manifest import MANIFEST as CHECKPOINT_MANIFEST

# owner/name or name, as the hub spells ids; anything else that does not exist locally is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_model(model: str, dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, object]:
    """(model in eval mode, tokenizer) for a built-in name, a local folder or .gguf file, or a hub id.

    dtype: of every floating tensor; None keeps the source's own (a bf16 folder stays bf16; GGUF files,
    whose weights are dequantized, load in fp32).
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ModelError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    kind, where = locate(model)
    if kind == "builtin":
        net = copy.deepcopy(builtin_model(str(where)))
        return net.to(dtype or torch.float32), gguf_tokenizer(str(where))
    if kind == "gguf":
        return load_gguf(where, dtype or torch.float32), gguf_tokenizer(str(where.resolve()))
    if kind == "folder":
        return _load_folder(where, model, dtype)
    return from_pretrained(str(where), model, dtype or "auto")


def _load_folder(path: Path, model: str, dtype: torch.dtype | None) -> tuple[torch.nn.Module, object]:
    """A local folder read tensor by tensor (`lowbit.models.folder`), else through from_pretrained."""
    auto_config = transformers.AutoConfig
    config = call_loader(model, "read the config of", lambda: auto_config.from_pretrained(path))
    net = call_loader(
        model,
        "load model",
        lambda: load_safetensors_folder(path, config, dtype or stored_dtype(path, config)[0]),
    )
    if net is None:
        return from_pretrained(str(path), model, dtype or "auto")
    return net, hf_tokenizer(str(path), model)


def open_folder(model: str, dtype: torch.dtype | None):
    """(skeleton on the meta device, {tensor name: (file, header entry)}, load dtype, tokenizer) of a local
    safetensors folder that `lowbit.models.folder` reads exactly, for reading block by block; None for
    any other source."""
    kind, where = locate(model)
    if kind != "folder":
        return None
    auto_config = transformers.AutoConfig
    config = call_loader(model, "read the config of", lambda: auto_config.from_pretrained(where))
    dtype = dtype or stored_dtype(where, config)[0]
    found = call_loader(model, "load model", lambda: folder_skeleton(where, config, dtype))
    if found is None:
        return None
    skeleton, headers = found
    skeleton.config.name_or_path = model  # the source the model card names
    return skeleton.eval(), headers, dtype, hf_tokenizer(str(where), model)


def locate(model: str) -> tuple[str, Path | str]:
    """Where `model` lives, without reading it: ("builtin", its .gguf), ("gguf", file), ("folder", path
    holding config.json) or ("hub", id). Refuses missing paths, lowbit checkpoints and ambiguous folders."""
    if not isinstance(model, str) or not model:
        raise ModelError(f"model must be a name, a path or a hub id, got {model!r}")
    name = model.removeprefix("builtin:")
    if name in BUILTIN_MODELS or model.startswith("builtin:"):
        return "builtin", builtin_path(name)  # an unknown built-in name is refused with the known ones
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        return _locate_in_folder(path, model)
    if path.exists():
        raise ModelError(f"model file {model!r} is not a .gguf file")
    first = Path(model.split("/")[0]).expanduser()
    looks_local = (
        model.startswith((".", "/", "~")) or path.suffix == ".gguf" or ("/" in model and first.is_dir())
    )
    if looks_local or not _HUB_ID.match(model):
        raise ModelError(f"model path {model!r} does not exist")
    if "/" not in model and (near := difflib.get_close_matches(model, BUILTIN_MODELS, n=1, cutoff=0.8)):
        raise ModelError(f"unknown model {model!r}; did you mean the built-in {near[0]!r}?")
    return "hub", model


def check_model(model: str) -> str:
    """What `model` names ("builtin", "gguf", "folder" or "hub"), after the checks that need no loading."""
    return locate(model)[0]


def streams_folder(model, out) -> bool:
    """Whether a compress job can read `model` block by block: a local model folder compressed into an
    output folder `out` (recipes that need the whole model still load it)."""
    return isinstance(model, str) and out is not None and locate(model)[0] == "folder"


def _locate_in_folder(path: Path, model: str) -> tuple[str, Path]:
    if (path / CHECKPOINT_MANIFEST).is_file():
        raise ModelError(f"{model!r} is a lowbit checkpoint; load it with lowbit.load")
    if (path / "config.json").is_file():
        return "folder", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelError(f"model folder {model!r} holds several .gguf files ({names}); name one")
    raise ModelError(f"model folder {model!r} has no config.json and no .gguf file")


def from_pretrained(source: str, model: str, dtype: torch.dtype | str) -> tuple[torch.nn.Module, object]:
    """A local HF folder or a hub id through the Auto classes (dtype "auto": the checkpoint's own)."""
    auto_model = transformers.AutoModelForCausalLM
    net = call_loader(model, "load model", lambda: auto_model.from_pretrained(source, dtype=dtype))
    return net.eval(), hf_tokenizer(source, model)


def hf_tokenizer(source: str, model: str):
    auto_tokenizer = transformers.AutoTokenizer
    return call_loader(model, "load the tokenizer of", lambda: auto_tokenizer.from_pretrained(source))
