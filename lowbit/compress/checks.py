"""Checks of a compress job's arguments, run before the model is loaded so that a typo costs nothing.

Every function raises a ValueError subclass with one line naming the argument.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lowbit.calibration.data import load_text
from lowbit.calibration.sources import FILE_LIKE_SUFFIXES
from lowbit.compress.recipe import Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_BUDGET = 32.0  # bits per weight: above it nothing is compressed


class ArgumentError(ValueError):
    """An argument of a compress or eval job that cannot work (bad device, dtype, budget, data source)."""


def check_device(device: str | torch.device | None) -> torch.device | None:
    """`device` parsed ("cpu", "cuda", "cuda:N", ...) and checked to exist on this machine."""
    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ArgumentError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(f"device {device} is not available: torch sees no CUDA device here")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ArgumentError(
                f"device {device} does not exist: {torch.cuda.device_count()} CUDA devices here"
            )
    elif d.type != "cpu":
        raise ArgumentError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    return d


def check_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A floating dtype from its name (float32, bfloat16, float16) or a torch.dtype."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ArgumentError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def check_budgets(budgets: list[float]) -> list[float]:
    """Budgets in bits per weight: finite, in (0, MAX_BUDGET], each a distinct checkpoint folder name."""
    for b in budgets:
        if not (isinstance(b, (int, float)) and math.isfinite(b) and 0 < b <= MAX_BUDGET):
            raise ArgumentError(
                f"a budget must be a number of bits per weight in (0, {MAX_BUDGET:g}], got {b!r}"
            )
    names = [f"{b:g}" for b in budgets]
    if len(set(names)) != len(names):
        raise ArgumentError(f"budgets repeat: {', '.join(names)}")
    return list(budgets)


def check_source(source: str) -> None:
    """A built-in or local text source must exist and hold text (read now); hub datasets are read later."""
    path = Path(source).expanduser()
    local = path.suffix in FILE_LIKE_SUFFIXES or path.exists() or source.startswith((".", "/", "~"))
    if source.startswith("builtin:") or local:
        load_text(source)


def calibrates(recipe: Recipe) -> bool:
    """Whether the job reads calibration data: GPTQ, SVDQuant, Fisher weights, an allocation's error
    table with a data-aware metric, or fine-tuning (which trains on the calibration blocks)."""
    return recipe.needs_calibration() or recipe.finetune is not None
