"""The work area of a compress job: each finished stage and layer saved, so a killed job resumes.

A job is keyed by what its results depend on (the model, the recipe without the budget, the calibration
settings): the same command, or the same model and recipe with another budget, finds the finished
calibration, error-table rows and layers of an earlier run and skips them. Every file is written to a
temporary name and renamed, so a kill leaves either the whole file or nothing. A work area may have a
size limit (`max_bytes`): a file that takes it past the limit stops the job with `WorkAreaFull`, the
files kept, so that the same job resumes with a larger limit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lowbit.nn.atomic import write_atomic
from lowbit.nn.manifest import FORMAT_VERSION

JOB_FILE = "job.json"


def job_key(description: dict) -> str:
    """A short stable hash of a JSON-able job description and the checkpoint format its layers are saved
    in (a work area of another format is not resumed)."""
    keyed = {**description, "checkpoint_format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


class WorkAreaFull(ValueError):
    """The work area grew past its size limit."""


class WorkArea:
    """Files of one job under root / key; `restart` discards what an earlier run left there; `max_bytes`
    bounds the size of its files (None: no limit), checked as files are added (`check_size`)."""

    def __init__(
        self, root: str | Path, description: dict, restart: bool = False, max_bytes: int | None = None
    ):
        self.dir = Path(root) / job_key(description)
        self.max_bytes = max_bytes
        self.top = self  # the area whose files the limit bounds: a sub-area's is its parent's
        if restart and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        job = self.dir / JOB_FILE
        if not job.exists():
            write_atomic(job, json.dumps(description, indent=2, sort_keys=True).encode())

    def path(self, name: str) -> Path:
        return self.dir / name

    def size(self) -> int:
        """Bytes of the job's files on disk."""
        return sum(p.stat().st_size for p in self.dir.rglob("*") if p.is_file())

    def sub(self, name: str, description: dict) -> WorkArea:
        """A work area inside this one (`name`), counted against this one's size limit."""
        area = WorkArea(self.path(name), description)
        area.top = self.top
        return area

    def check_size(self) -> None:
        """Raise WorkAreaFull when the files of the job (the top area's) exceed its limit."""
        limit = self.top.max_bytes
        if limit is None:
            return
        size = self.top.size()
        if size > limit:
            raise WorkAreaFull(
                f"the work area {self.top.dir} holds {size / 1e9:.2f} GB, over its limit of "
                f"{limit / 1e9:.2f} GB; its finished stages are kept: the job resumes with a larger limit"
            )

    def save(self, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Write tensors + JSON metadata as one safetensors file, atomically."""
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(tmp), metadata={"lowbit": json.dumps(meta)})
        os.replace(tmp, path)
        self.check_size()

    def load(self, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, metadata) of a finished file, or None when it is missing or unreadable."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["lowbit"])
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except (OSError, SafetensorError, KeyError, ValueError):
            return None
