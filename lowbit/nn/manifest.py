"""A lowbit checkpoint's manifest (`lowbit_config.json`) and the checks that every file is whole.

The manifest names the format version, the lowbit version, the recipe, each quantized layer's plan and
the sha256 of every file; `validate_manifest` checks its schema, `verify_files` the files against it,
`read_safetensors_header` a safetensors file's header against its size. Bad input raises
`CheckpointError` naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath

from lowbit.nn.qlinear import OPTIONAL_PLAN_KEYS, PLAN_KEYS
from lowbit.quantizers import QuantSpec, SpecError

# 2: asymmetric INT zero points packed at the codes' width (flattened: [ceil(N * G / 8) * b]); 1 stored
# a byte each ([N, G]), which `lowbit.nn.checkpoint.load` still reads
FORMAT_VERSION = 2
ZEROS_PACKED_FROM = 2
MANIFEST = "lowbit_config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # the index of a sharded checkpoint (`lowbit.nn.shards`)
MAX_JSON_BYTES = 64 << 20  # a manifest or config.json larger than this is refused before parsing
MAX_JSON_DEPTH = 32  # deeper nesting is refused (a manifest needs 5 levels, a config.json a few)
# unlisted files with these endings would be read by transformers (weights, configs, tokenizers, code)
READ_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".bin", ".py", ".tiktoken", ".pt")
# config.json sizes that set allocations, each checked against the stored tensors before the model is built
SIZE_KEYS = ("vocab_size", "hidden_size")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")  # a block's index: the first numeric part of a tensor name
MANIFEST_KEYS = ("format_version", "lowbit_version", "recipe", "layers", "files")
MANIFEST_TYPES = (
    ("lowbit_version", str, "a string"),
    ("recipe", (dict, type(None)), "an object or null"),
    ("layers", dict, "an object mapping layer names to entries"),
    ("files", dict, "an object mapping file names to sha256 digests"),
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read: bad manifest, missing or corrupt file, wrong layout."""


def lowbit_version() -> str:
    try:
        return version("lowbit")
    except PackageNotFoundError:
        return "unknown"


def check_layer_entry(fqn: str, e: object) -> None:
    where = f"manifest layer {fqn!r}"
    if not isinstance(e, dict) or not set(PLAN_KEYS) <= set(e) <= {*PLAN_KEYS, *OPTIONAL_PLAN_KEYS}:
        optional = ", ".join(OPTIONAL_PLAN_KEYS)
        raise CheckpointError(f"{where} must be an object with keys {', '.join(PLAN_KEYS)} (and {optional})")
    if not isinstance(e["spec"], dict):
        raise CheckpointError(f"{where}: spec must be an object, got {e['spec']!r}")
    try:
        QuantSpec.from_dict(e["spec"])
    except (SpecError, TypeError) as err:
        raise CheckpointError(f"{where}: bad spec: {err}") from None
    shape = e["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(v) and v > 0 for v in shape)):
        raise CheckpointError(f"{where}: shape must be [out_features, in_features], got {shape!r}")
    if not (_is_int(e["rank"]) and e["rank"] >= 0):
        raise CheckpointError(f"{where}: rank must be a non-negative integer, got {e['rank']!r}")
    for key in ("bias", "smooth", *(k for k in OPTIONAL_PLAN_KEYS if k in e)):
        if not isinstance(e[key], bool):
            raise CheckpointError(f"{where}: {key} must be true or false, got {e[key]!r}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_manifest(d: dict) -> dict:
    """Check a manifest's keys, types and format version; return it unchanged or raise CheckpointError.

    Schema (format_version 1 and 2): {"format_version": int, "lowbit_version": str, "recipe": object | null,
    "layers": {fqn: {"spec": QuantSpec dict, "shape": [N, K], "rank": int, "bias": bool, "smooth": bool,
    optional "hadamard": bool (only written when true: the layer multiplies its input by R first)}},
    "files": {relative path: sha256 hex}}; "files" names config.json and model.safetensors, or the
    index of the shards (model.safetensors.index.json) and each shard it names.
    """
    if not isinstance(d, dict):
        raise CheckpointError("manifest must be a JSON object")
    v = d.get("format_version")
    if not _is_int(v) or v < 1:
        raise CheckpointError(f"manifest format_version must be a positive integer, got {v!r}")
    if v > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format_version {v} is newer than this lowbit "
            f"(supports {FORMAT_VERSION}); upgrade lowbit"
        )
    if set(d) != set(MANIFEST_KEYS):
        missing, unknown = set(MANIFEST_KEYS) - set(d), set(d) - set(MANIFEST_KEYS)
        raise CheckpointError(f"manifest keys wrong: missing {sorted(missing)}, unknown {sorted(unknown)}")
    for key, types, what in MANIFEST_TYPES:
        if not isinstance(d[key], types):
            raise CheckpointError(f"manifest {key} must be {what}, got {type(d[key]).__name__}")
    for fqn, e in d["layers"].items():
        check_layer_entry(fqn, e)
    files = d["files"]
    for name, digest in files.items():
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts or name in ("", MANIFEST) or "\\" in name:
            raise CheckpointError(f"manifest lists a bad file name {name!r}")
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= set("0123456789abcdef")):
            raise CheckpointError(f"manifest sha256 of {name} is not 64 lowercase hex digits")
    weights = WEIGHTS_INDEX if WEIGHTS_INDEX in files else WEIGHTS
    if missing := sorted({weights, "config.json"} - set(files)):
        raise CheckpointError(f"manifest files do not list {', '.join(missing)}")
    return d


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a lowbit checkpoint folder (it holds a manifest)."""
    return (Path(path) / MANIFEST).is_file()


def _depth(obj: object) -> int:
    """The nesting depth of a parsed JSON value, walked without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def read_json(f: Path, what: str) -> object:
    """A checkpoint's JSON file, refused when over MAX_JSON_BYTES, nested over MAX_JSON_DEPTH or invalid."""
    if f.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{what} is larger than {MAX_JSON_BYTES >> 20} MiB")
    try:
        text = f.read_text()
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what} is not valid JSON ({e})") from None
    try:
        d = json.loads(text)
    except RecursionError:  # the C parser stops at the interpreter's recursion limit, cleanly
        raise CheckpointError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} is not valid JSON ({str(e)[:100]})") from None
    if _depth(d) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    return d


def read_manifest(path: str | Path) -> dict:
    """The validated manifest of the checkpoint folder `path`."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise CheckpointError(f"{path} is not a lowbit checkpoint (no {MANIFEST})")
    return validate_manifest(read_json(f, f"{MANIFEST} in {path}"))


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, after checking that the file holds every byte it declares."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > size - 8:
            raise CheckpointError(f"checkpoint file {path.name} is truncated ({size} bytes, header cut off)")
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, IndexError):
            raise CheckpointError(f"checkpoint file {path.name} has a corrupt safetensors header") from None
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise CheckpointError(f"checkpoint file {path.name} is {what} ({size} of {expected} bytes)")
    return header


def _allowed_link(link: Path, folder: Path) -> bool:
    """A link that stays inside the folder, or a Hugging Face cache snapshot's link to its own blobs
    (`<repo>/snapshots/<rev>/file -> ../../blobs/<sha>`; the manifest's hashes still check the content)."""
    target = link.resolve()
    inside = [folder.resolve()]
    if folder.parent.name == "snapshots":
        inside.append((folder.parent.parent / "blobs").resolve())
    return target.is_file() and any(target.is_relative_to(d) for d in inside)


def check_folder(path: Path, manifest: dict) -> None:
    """No symbolic link leading out of the checkpoint folder, and no unlisted file that transformers would
    read (a tokenizer or config file added after the checkpoint was written changes what the model does)."""
    if path.is_symlink():
        raise CheckpointError(f"checkpoint folder {path} is a symbolic link; give the real folder")
    listed = set(manifest["files"]) | {MANIFEST}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            rel = (Path(root) / name).relative_to(path).as_posix()
            if (Path(root) / name).is_symlink() and not _allowed_link(Path(root) / name, path):
                raise CheckpointError(
                    f"checkpoint file {rel} is a symbolic link out of the folder; give plain files"
                )
            read = name in files and name.endswith(READ_SUFFIXES) and not name.startswith(".")
            if read and rel not in listed:
                raise CheckpointError(f"checkpoint file {rel} is not listed in {MANIFEST}; remove it")


def check_config_sizes(config: dict, header: dict, plan: dict) -> None:
    """config.json's layer count and sizes must match the stored tensors (`header`: the safetensors header,
    `plan`: the quantized layers), so that a bad config is refused before any model is built."""
    names = [k for k in header if k != "__metadata__"] + list(plan)
    dims = {d for v in header.values() if isinstance(v, dict) for d in v.get("shape", ())}
    dims |= {d for e in plan.values() for d in e["shape"]}
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    layers = {int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n))}
    n = text.get("num_hidden_layers")
    if n is not None and not (_is_int(n) and n == len(layers) and layers == set(range(n))):
        raise CheckpointError(
            f"config.json num_hidden_layers {n!r} does not match the {len(layers)} stored layers"
        )
    for key in SIZE_KEYS:
        v = text.get(key)
        if v is not None and not (_is_int(v) and v in dims):
            raise CheckpointError(f"config.json {key} {v!r} matches no stored tensor's size")


def check_finite(tensors, layers) -> None:
    """Every floating-point tensor that a quantized layer stores among the (name, tensor) pairs `tensors`
    (scales, zero points, second-level scales, a format family's own per-group tensor, low-rank factors,
    smoothing) is finite; layers: the quantized layers' names. Codes are integers; the bias is the
    model's own."""
    for name, t in tensors:
        layer, _, field = name.rpartition(".")
        if layer in layers and field != "bias" and t.is_floating_point() and not t.isfinite().all():
            raise CheckpointError(f"tensor {name} holds NaN or infinite values; the checkpoint is corrupt")


def verify_files(path: Path, manifest: dict) -> None:
    """No symbolic link or unlisted file in the folder; every file of the manifest exists, has its sha256,
    and safetensors files are complete."""
    check_folder(path, manifest)
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {name} is missing from {path}")
        if name.endswith(".safetensors"):
            read_safetensors_header(f)
        if sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {name} is corrupt (sha256 does not match the manifest)")


def verify_checkpoint(path: Path) -> dict:
    """The manifest of checkpoint folder `path` after every check that needs no model: manifest schema,
    folder contents, files' sizes and hashes, config.json's sizes against the stored tensors."""
    manifest = read_manifest(path)
    verify_files(path, manifest)
    config = read_json(path / "config.json", f"config.json in {path}")
    if not isinstance(config, dict):
        raise CheckpointError(f"config.json in {path} must be a JSON object")
    header = {}
    for name in manifest["files"]:
        if name.endswith(".safetensors"):
            header.update(read_safetensors_header(path / name))
    check_config_sizes(config, header, manifest["layers"])
    return manifest
