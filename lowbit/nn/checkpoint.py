"""Checkpoints: a compressed model as safetensors shards, the model's config and a JSON manifest.

A checkpoint folder holds the model's state dict (each QLinear as `{layer}.codes`, `.scales`, `.zeros`,
`.dq_absmax`, `.l1`, `.l2`, `.smooth`, `.bias`, only those that exist; every other tensor as it was; tied
copies left out and re-tied on load) in `model.safetensors`, or, past the maximum shard size, in
`model-0000k-of-0000n.safetensors` with `model.safetensors.index.json` (`lowbit.nn.shards`); the model's
own `config.json`, the tokenizer's files when given, and `lowbit_config.json`, the manifest
(`lowbit.nn.manifest`). `docs/formats.md` describes the layout. No file is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lowbit.kernels.dispatch import resolve_backend
from lowbit.nn.atomic import atomic_folder
from lowbit.nn.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    ZEROS_PACKED_FROM,
    CheckpointError,
    check_finite,
    check_folder,
    lowbit_version,
    read_manifest,
    sha256,
    validate_manifest,
    verify_checkpoint,
)
from lowbit.nn.model_card import CARD, model_card
from lowbit.nn.qlinear import QLinear, replace_linears
from lowbit.nn.shards import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX,
    finish_shards,
    layout_of,
    read_headers,
    split_layout,
    weight_files,
    write_safetensors,
)
from lowbit.quantizers import TENSOR_FIELDS, QuantInputError, QuantSpec, pack_side, stored_layout

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


def saveable_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as written: tied copies dropped (first name kept), each tensor contiguous, on the CPU,
    unshared."""
    state, seen, storages = {}, set(), set()
    for name, t in tensors.items():
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


def write_state(state: dict[str, torch.Tensor], tmp: Path, max_shard_bytes: int) -> None:
    """Write the tensors of `state` into folder `tmp` as shards of at most max_shard_bytes."""
    shards = []
    for k, group in enumerate(split_layout(layout_of(state), max_shard_bytes), 1):
        shards.append(tmp / f".shard-{k:05d}.safetensors")
        write_safetensors(shards[-1], group, state.__getitem__)
    finish_shards(shards, tmp)


def finish_checkpoint(
    tmp: Path, config, tokenizer, plan: dict, recipe: dict | None, bits: int, source: str
) -> None:
    """Complete a checkpoint whose weights are in folder `tmp`: config (with the transformers quantization
    config), tokenizer, model card (naming `source`) and the manifest with the sha256 of every file.
    bits: the stored bits of the quantized layers (`plan_bits`)."""
    from lowbit.nn.hf_quantizer import add_quantization_config

    manifest = {"format_version": FORMAT_VERSION, "lowbit_version": lowbit_version()}
    manifest.update(recipe=recipe, layers=plan)
    config.save_pretrained(tmp)
    add_quantization_config(tmp / "config.json", plan)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    weights = sum(e["shape"][0] * e["shape"][1] for e in plan.values())
    (tmp / CARD).write_text(model_card(source, plan, recipe, bits / weights if weights else 0.0))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest["files"] = {p.relative_to(tmp).as_posix(): sha256(p) for p in files}
    (tmp / MANIFEST).write_text(json.dumps(validate_manifest(manifest), indent=2) + "\n")


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
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write `model` (QLinears per `plan`, default the model's own) as a checkpoint folder `out_dir`, its
    tensors in shards of at most max_shard_bytes; return its path. A model from `lowbit.load` or from
    transformers saves again with its manifest.

    Everything is written into a hidden sibling folder first and renamed into place, so a failure
    never leaves a half-written `out_dir`; an existing `out_dir` is replaced only with overwrite=True.
    """
    if not hasattr(getattr(model, "config", None), "save_pretrained"):
        raise CheckpointError("model has no transformers config; cannot write a loadable checkpoint")
    plan = model_plan(model) if plan is None else plan
    _check_plan(plan, model_plan(model))
    check_serialisable(recipe, plan)
    source = getattr(model.config, "name_or_path", "") or type(model).__name__
    with atomic_folder(out_dir, overwrite) as tmp:
        write_state(saveable_state(model.state_dict()), tmp, max_shard_bytes)
        finish_checkpoint(tmp, model.config, tokenizer, plan, recipe, plan_bits(model, plan), source)
    return Path(out_dir)


def check_serialisable(recipe: dict | None, plan: dict) -> None:
    try:
        json.dumps({"recipe": recipe, "layers": plan})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"recipe or plan is not JSON-serialisable ({e})") from None


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


def pack_v1_zeros(state: dict[str, torch.Tensor], plan: dict) -> None:
    """Format 1's zero points, a byte each ([N, G]), packed in place at the codes' width as format 2
    stores them (`pack_side`); tensors of another shape are left for the layout check to report."""
    for fqn, e in plan.items():
        spec, key = QuantSpec.from_dict(e["spec"]), f"{fqn}.zeros"
        t = state.get(key)
        groups = (e["shape"][0], spec.groups(e["shape"][1]))
        if not spec.has_zeros or t is None or t.dtype != torch.uint8 or tuple(t.shape) != groups:
            continue
        try:
            state[key] = pack_side(t, spec)
        except QuantInputError as err:
            raise CheckpointError(f"tensor {key}: {err}") from None


def _read_state(
    path: Path, plan: dict, device: str, dtype: torch.dtype | None, version: int = FORMAT_VERSION
) -> dict[str, torch.Tensor]:
    """Tensors of the checkpoint's shards on `device` as format `FORMAT_VERSION` holds them (a format 1
    checkpoint's zero points packed); floating ones other than quantized fields cast to dtype."""
    state = {}
    for f in weight_files(path):
        try:
            state.update(load_file(str(f), device=device))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint file {f.name} cannot be read ({e})") from None
    if version < ZEROS_PACKED_FROM:
        pack_v1_zeros(state, plan)
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
    check_finite(state.items(), plan)
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
    A format 1 checkpoint loads too (its zero points are packed as it loads; `save` writes format 2).
    Raises CheckpointError on a bad manifest, a missing, truncated or altered file, or a layout mismatch.
    """
    path = Path(path)
    manifest = verify_checkpoint(path)
    resolve_backend(backend)
    device = str(torch.device(device))
    plan = manifest["layers"]
    model = _skeleton(path, plan, backend)
    state = _read_state(path, plan, device, dtype, manifest["format_version"])
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
        weights = name == INDEX or name.endswith(".safetensors")
        if not weights and (not f.is_file() or sha256(f) != digest):
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
    nbytes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, (_, v) in read_headers(path).items()}
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
