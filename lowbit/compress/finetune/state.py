"""The resumable state of a run: trained tensors, AdamW's moments, the step and the RNG state."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lowbit.compress.finetune.config import FinetuneError

STATE_TENSORS, STATE_META, STATE_VERSION = "finetune_state.safetensors", "finetune_state.json", 1


@dataclass
class TrainState:
    """The resumable part of a run besides the tensors."""

    step: int = 0
    losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    best_loss: float = math.inf
    best_step: int | None = None
    bad_evals: int = 0
    stopped: bool = False
    best: dict = field(default_factory=dict)


def _digest(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.contiguous().numpy().tobytes()).hexdigest()


def save_state(
    folder: str | Path, params: dict, opt: torch.optim.Optimizer, st: TrainState, meta: dict
) -> None:
    """Write the run's state to `folder`: tensors (trained, AdamW moments, best, RNG) as safetensors and
    the rest as JSON; each file is written under a temporary name and renamed, the JSON last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    for name, p in params.items():
        tensors[f"param/{name}"] = p.detach()
        for key, t in opt.state.get(p, {}).items():
            tensors[f"{key}/{name}"] = t
    tensors.update({f"best/{n}": t for n, t in st.best.items()})
    tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    tmp = folder / f".{STATE_TENSORS}.tmp"
    save_file(tensors, str(tmp), metadata={"step": str(st.step)})
    os.replace(tmp, folder / STATE_TENSORS)
    body = {k: v for k, v in asdict(st).items() if k != "best"}
    body["best_loss"] = None if math.isinf(st.best_loss) else st.best_loss
    text = json.dumps({"version": STATE_VERSION, **meta, "state": body}, indent=1)
    (folder / f".{STATE_META}.tmp").write_text(text)
    os.replace(folder / f".{STATE_META}.tmp", folder / STATE_META)


def load_state(folder: str | Path, params: dict, opt: torch.optim.Optimizer, meta: dict) -> TrainState | None:
    """Resume from `folder` (None when it holds no state): load tensors into params and the optimizer."""
    folder = Path(folder)
    if not (folder / STATE_META).is_file():
        return None
    try:
        saved = json.loads((folder / STATE_META).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise FinetuneError(f"saved fine-tuning state in {folder} cannot be read ({e})") from None
    if saved.get("version") != STATE_VERSION:
        raise FinetuneError(f"saved fine-tuning state in {folder} has an unknown version")
    for key, value in meta.items():
        if saved.get(key) != value:
            raise FinetuneError(f"saved fine-tuning state in {folder} was made with another {key}")
    st = TrainState(**saved["state"])
    st.best_loss = math.inf if st.best_loss is None else st.best_loss
    for name, p in params.items():
        t = tensors.get(f"param/{name}")
        if t is None or t.shape != p.shape:
            raise FinetuneError(f"saved fine-tuning state lacks tensor {name} of shape {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(t)
        moments = {
            k: tensors[f"{k}/{name}"] for k in ("step", "exp_avg", "exp_avg_sq") if f"{k}/{name}" in tensors
        }
        if moments:
            opt.state[p] = {k: t if k == "step" else t.to(p.device) for k, t in moments.items()}
        if f"best/{name}" in tensors:
            st.best[name] = tensors[f"best/{name}"].to(p.device)
    torch.set_rng_state(tensors["rng/cpu"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return st
