"""The work area of a compress job: each finished stage and layer saved, so a killed job resumes.

A job is keyed by what its results depend on (the model, the recipe without the budget, the calibration
settings): the same command, or the same model and recipe with another budget, finds the finished
calibration, error-table rows and layers of an earlier run and skips them. Every file is written to a
temporary name and renamed, so a kill leaves either the whole file or nothing.
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

JOB_FILE = "job.json"


def job_key(description: dict) -> str:
    """A short stable hash of a JSON-able job description."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


class WorkArea:
    """Files of one job under root / key; `restart` discards what an earlier run left there."""

    def __init__(self, root: str | Path, description: dict, restart: bool = False):
        self.dir = Path(root) / job_key(description)
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

    def save(self, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Write tensors + JSON metadata as one safetensors file, atomically."""
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(tmp), metadata={"lowbit": json.dumps(meta)})
        os.replace(tmp, path)

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
