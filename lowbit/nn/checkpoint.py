"""Checkpoints: a compressed model as one safetensors file, the model's config and a JSON manifest.

A checkpoint folder holds `model.safetensors` (the model's state dict: each QLinear as
`{layer}.codes`, `.scales`, `.zeros`, `.dq_absmax`, `.l1`, `.l2`, `.smooth`, `.bias`, only those that
exist; every other tensor as it was; tied copies left out and re-tied on load), the model's own
`config.json`, the tokenizer's files when given, and `lowbit_config.json`, the manifest
(`lowbit.nn.manifest`). `docs/formats.md` describes the layout. No file is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.kernels.dispatch import resolve_backend
from lowbit.nn.atomic import atomic_folder
from lowbit.nn.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    CheckpointError,
    check_finite,
    check_folder,
    lowbit_version,
    read_manifest,
    read_safetensors_header,
    sha256,
    validate_manifest,
    verify_checkpoint,
)
from lowbit.nn.model_card import CARD, model_card
from lowbit.nn.qlinear import QLinear, replace_linears
from lowbit.quantizers import TENSOR_FIELDS, QuantSpec, stored_layout

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def model_plan(model: nn.Module) -> dict[str, dict]:
    """The per-layer plan of every QLinear in `model`, by fully qualified name, in module order."""
    return {name: m.layer_plan() for name, m in model.named_modules() if isinstance(m, QLinear)}


def plan_bits(model: nn.Module, plan: dict[str, dict]) -> int:
    """Exact storage bits of the quantized layers: codes, scales, zeros, low-rank factors, smoothing."""
    total = 0
    for name in plan:
        m = model.get_submodule(name)
        total += sum(t.numel() * t.element_size() * 8 for n, t in m.state_dict().items() if n != "bias")
    return total


def model_bits_per_weight(model: nn.Module) -> float:
    """Bits per weight of a model's QLinears as `plan_bits` counts them, over their weights."""
    plan = model_plan(model)
    weights = sum(e["shape"][0] * e["shape"][1] for e in plan.values())
    return plan_bits(model, plan) / weights if weights else 0.0


def _saveable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict, tied copies dropped (first name kept), each tensor contiguous, on the CPU, unshared."""
    state, seen, storages = {}, set(), set()
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            raise CheckpointError(f"tensor {name} is on the meta device (never loaded); cannot save it")
        t = t.detach()
        if t.numel():
            key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            if key in seen:
                continue
            seen.add(key)
            storage = (t.device, t.untyped_storage().data_ptr())
            t = t.clone() if storage in storages else t
            storages.add(storage)
        state[name] = t.contiguous().cpu()
    return state


def _write_files(model: nn.Module, tmp: Path, tokenizer, plan: dict, recipe: dict | None) -> dict[str, str]:
    """Write weights, config (with the transformers quantization config), tokenizer and model card into
    `tmp`; return {relative name: sha256} of every file."""
    from lowbit.nn.hf_quantizer import add_quantization_config

    save_file(_saveable_state(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    add_quantization_config(tmp / "config.json", plan)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    weights = sum(e["shape"][0] * e["shape"][1] for e in plan.values())
    bits = plan_bits(model, plan) / weights if weights else 0.0
    source = getattr(model.config, "name_or_path", "") or type(model).__name__
    (tmp / CARD).write_text(model_card(source, plan, recipe, bits))
    return {p.relative_to(tmp).as_posix(): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}


def _check_plan(plan: dict, actual: dict) -> None:
    """The plan given to save must describe exactly the model's QLinears."""
    for fqn in sorted(set(plan) | set(actual)):
        if fqn not in actual:
            raise CheckpointError(f"plan names layer {fqn!r}, which is not a QLinear of the model")
        if fqn not in plan:
            raise CheckpointError(f"QLinear layer {fqn!r} of the model is missing from the plan")
        if plan[fqn] != actual[fqn]:
            raise CheckpointError(
                f"plan entry of layer {fqn!r} does not match the model's QLinear: {actual[fqn]}"
            )


def save(
    model: nn.Module,
    out_dir: str | Path,
    *,
    plan: dict | None = None,
    recipe: dict | None = None,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (QLinears per `plan`, default the model's own) as a checkpoint folder `out_dir`;
    return its path. A model from `lowbit.load` or from transformers saves again with its manifest.

    Everything is written into a hidden sibling folder first and renamed into place, so a failure
    never leaves a half-written `out_dir`; an existing `out_dir` is replaced only with overwrite=True.
    """
    if not hasattr(getattr(model, "config", None), "save_pretrained"):
        raise CheckpointError("model has no transformers config; cannot write a loadable checkpoint")
    plan = model_plan(model) if plan is None else plan
    _check_plan(plan, model_plan(model))
    manifest = {"format_version": FORMAT_VERSION, "lowbit_version": lowbit_version()}
    manifest.update(recipe=recipe, layers=plan)
    try:
        json.dumps(manifest)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"recipe or plan is not JSON-serialisable ({e})") from None
    with atomic_folder(out_dir, overwrite) as tmp:
        manifest["files"] = _write_files(model, tmp, tokenizer, plan, recipe)
        (tmp / MANIFEST).write_text(json.dumps(validate_manifest(manifest), indent=2) + "\n")
    return Path(out_dir)


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one object (tied weights), each group in module order."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _fill_tied(state: dict, groups: list[list[str]]) -> list[tuple[str, str]]:
    """Point each tied name the file left out at its saved twin; return the (name, twin) pairs."""
    retie = []
    for group in groups:
        present = [n for n in group if n in state]
        for name in group:
            if present and name not in state:
                state[name] = state[present[0]]
                retie.append((name, present[0]))
    return retie


def _skeleton(path: Path, plan: dict, backend: str) -> nn.Module:
    """The model from config.json with empty (meta) weights, tied as configured, QLinears swapped in."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"config.json in {path} cannot be read ({str(e).splitlines()[0]})") from None
    with init_empty_weights(include_buffers=False):  # non-persistent buffers (rotary inv_freq) stay real
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    return replace_linears(model, plan, device="meta", backend=backend)


def _read_state(path: Path, plan: dict, device: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Tensors of model.safetensors on `device`; floating ones other than quantized fields cast to dtype."""
    try:
        state = load_file(str(path / WEIGHTS), device=device)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint file {WEIGHTS} cannot be read ({e})") from None
    quantized = set()
    for fqn, e in plan.items():
        layout = stored_layout(QuantSpec.from_dict(e["spec"]), *e["shape"])
        for field, (shape, field_dtype) in layout.items():
            key = f"{fqn}.{field}"
            t = state.get(key)
            if t is None or tuple(t.shape) != shape or t.dtype != field_dtype:
                got = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
                raise CheckpointError(f"tensor {key} is {got}; the plan expects {shape} {field_dtype}")
            quantized.add(key)
    check_finite(state.items())
    if dtype is not None:
        state = {
            k: t.to(dtype) if t.is_floating_point() and k not in quantized else t for k, t in state.items()
        }
    return state


def load(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> nn.Module:
    """The model stored in checkpoint folder `path`, in eval mode, its QLinears running on `backend`.

    dtype: cast every floating tensor except quantized codes, scales, zeros (None keeps stored dtypes).
    Raises CheckpointError on a bad manifest, a missing, truncated or altered file, or a layout mismatch.
    """
    path = Path(path)
    manifest = verify_checkpoint(path)
    resolve_backend(backend)
    device = str(torch.device(device))
    plan = manifest["layers"]
    model = _skeleton(path, plan, backend)
    state = _read_state(path, plan, device, dtype)
    retie = _fill_tied(state, _alias_groups(model))
    expected = set(model.state_dict())
    missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unknown:
        raise CheckpointError(
            f"{WEIGHTS} does not fit the model: missing {missing[:3]}, unexpected {unknown[:3]}"
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{WEIGHTS} does not fit the model ({' '.join(str(e).split())[:300]})"
        ) from None
    for name, src in retie:
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(src))
    model.to(device)
    if dtype is not None:
        model.config.dtype = dtype
    return model.eval()


def load_tokenizer(path: str | Path):
    """The tokenizer saved with the checkpoint at `path`, or None when it has no tokenizer files."""
    path = Path(path)
    manifest = read_manifest(path)
    check_folder(path, manifest)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    for name, digest in manifest["files"].items():  # the tokenizer's files (everything but the weights)
        f = path / name
        if name != WEIGHTS and (not f.is_file() or sha256(f) != digest):
            raise CheckpointError(f"checkpoint file {name} is corrupt (sha256 does not match the manifest)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _layer_info(fqn: str, e: dict, nbytes: dict[str, int]) -> dict:
    spec = QuantSpec.from_dict(e["spec"])
    if f"{fqn}.codes" not in nbytes:
        raise CheckpointError(f"{WEIGHTS} has no tensor {fqn}.codes for quantized layer {fqn!r}")
    layout = stored_layout(spec, *e["shape"])  # with a format family's own side tensor, if any
    b = {f: nbytes.get(f"{fqn}.{f}", 0) for f in (*TENSOR_FIELDS, *layout, "l1", "l2", "smooth")}
    parts = {
        "codes_bytes": b["codes"],
        "scales_bytes": b["scales"] + b["dq_absmax"],
        "zeros_bytes": sum(b[f] for f in layout if f not in ("codes", "scales", "dq_absmax")),
        "lowrank_bytes": b["l1"] + b["l2"],
        "smooth_bytes": b["smooth"],
    }
    total = sum(parts.values())
    N, K = e["shape"]
    fields = ("format", "bits", "group_size", "symmetric", "double_quant")
    info = {"spec": spec.short(), **{k: getattr(spec, k) for k in fields}, "shape": [N, K], "rank": e["rank"]}
    return {**info, "bytes": total, **parts, "bits_per_weight": 8 * total / (N * K)}


def checkpoint_info(path: str | Path) -> dict:
    """Per-layer formats and exact stored sizes of a checkpoint, and totals.

    A layer's bytes count its codes, scales (with second-level scales), zeros (or a format family's other
    side tensor), low-rank factors and smoothing vector, not its bias; totals["bits_per_weight"] is
    8 * those bytes / quantized weights.
    """
    path = Path(path)
    manifest = read_manifest(path)
    f = path / WEIGHTS
    if not f.is_file():
        raise CheckpointError(f"checkpoint file {WEIGHTS} is missing from {path}")
    header = read_safetensors_header(f)
    nbytes = {
        k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"
    }
    layers = {fqn: _layer_info(fqn, e, nbytes) for fqn, e in manifest["layers"].items()}
    params = sum(x["shape"][0] * x["shape"][1] for x in layers.values())
    quantized = sum(x["bytes"] for x in layers.values())
    tensors = sum(nbytes.values())
    return {
        "path": str(path),
        "format_version": manifest["format_version"],
        "lowbit_version": manifest["lowbit_version"],
        "recipe": manifest["recipe"],
        "layers": layers,
        "totals": {
            "layers": len(layers),
            "params": params,
            "quantized_bytes": quantized,
            "bits_per_weight": 8 * quantized / params if params else 0.0,
            "other_bytes": tensors - quantized,
            "tensor_bytes": tensors,
            "file_bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
        },
    }
