"""A lowbit checkpoint's manifest (`lowbit_config.json`) and the checks that every file is whole.

The manifest names the format version, the lowbit version, the recipe, each quantized layer's plan and
the sha256 of every file; `validate_manifest` checks its schema, `verify_files` the files against it,
`read_safetensors_header` a safetensors file's header against its size. Bad input raises
`CheckpointError` naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import struct
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath

from lowbit.nn.qlinear import PLAN_KEYS
from lowbit.quantizers import QuantSpec, SpecError

FORMAT_VERSION = 1
MANIFEST = "lowbit_config.json"
WEIGHTS = "model.safetensors"
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
    if not isinstance(e, dict) or set(e) != set(PLAN_KEYS):
        raise CheckpointError(f"{where} must be an object with keys {', '.join(PLAN_KEYS)}")
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
    for key in ("bias", "smooth"):
        if not isinstance(e[key], bool):
            raise CheckpointError(f"{where}: {key} must be true or false, got {e[key]!r}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_manifest(d: dict) -> dict:
    """Check a manifest's keys, types and format version; return it unchanged or raise CheckpointError.

    Schema (format_version 1): {"format_version": int, "lowbit_version": str, "recipe": object | null,
    "layers": {fqn: {"spec": QuantSpec dict, "shape": [N, K], "rank": int, "bias": bool, "smooth": bool}},
    "files": {relative path: sha256 hex}}; "files" names model.safetensors and config.json.
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
    if missing := sorted({WEIGHTS, "config.json"} - set(files)):
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


def read_manifest(path: str | Path) -> dict:
    """The validated manifest of the checkpoint folder `path`."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise CheckpointError(f"{path} is not a lowbit checkpoint (no {MANIFEST})")
    try:
        d = json.loads(f.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{MANIFEST} in {path} is not valid JSON ({e})") from None
    return validate_manifest(d)


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


def verify_files(path: Path, manifest: dict) -> None:
    """Every file of the manifest exists, has its sha256, and safetensors files are complete."""
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {name} is missing from {path}")
        if name.endswith(".safetensors"):
            read_safetensors_header(f)
        if sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {name} is corrupt (sha256 does not match the manifest)")
