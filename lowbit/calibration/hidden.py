"""The calibration hidden states entering the current decoder block, kept in memory up to a limit and on
disk past it.

`calibrate_sequential` runs every calibration sample through one block at a time, so it keeps the hidden
states of all of them ([S, L, D] in the model's dtype: 2 GiB for 128 samples of 2048 tokens at hidden
size 4096 in bf16, 8 GiB in fp32 at hidden size 8192) between two blocks. `HiddenStates` holds them one
micro-batch [B, L, D] at a time: the first micro-batches stay in memory while their total stays within
`limit` bytes, the others are written to a folder of their own, one safetensors file per micro-batch, and
read back when their turn comes; a block's output for a micro-batch replaces its input (the input file is
read whole before it is replaced, through a temporary name, so a file is always whole). Memory then holds
at most `limit` bytes plus the micro-batch in flight (its input and output), and the disk the rest once.
The values go through the file bit for bit, so a run with a limit computes exactly what a run without
one does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from lowbit.calibration.stats import CalibrationError

KEY = "hidden"


class HiddenStates(Sequence):
    """hidden[j]: micro-batch j's hidden states [B, L, D] on `device`; hidden[j] = t replaces them.

    limit: bytes kept in memory (None: no limit, nothing written; 0: every micro-batch on disk).
    folder: where the files' own temporary folder is made (default: the system's temporary folder);
    it is removed by `close` (the class is a context manager). Which micro-batches stay in memory is
    fixed when each is first stored, in order.
    """

    def __init__(self, limit: int | None = None, folder: str | Path | None = None):
        if limit is not None and limit < 0:
            raise CalibrationError(f"the hidden-state memory limit must be >= 0 bytes, got {limit}")
        self.limit, self.parent = limit, folder
        self.memory: list[Tensor | None] = []  # None: on disk
        self.layout: list[tuple[torch.dtype, tuple[int, ...], torch.device]] = []
        self.held = 0  # bytes in memory
        self.dir: Path | None = None

    def __len__(self) -> int:
        return len(self.layout)

    def _path(self, j: int) -> Path:
        return self.dir / f"{j:05d}.safetensors"

    def __getitem__(self, j: int) -> Tensor:
        if not 0 <= j < len(self):
            raise IndexError(j)
        if self.memory[j] is not None:
            return self.memory[j]
        device = self.layout[j][2]
        with safe_open(str(self._path(j)), framework="pt", device=str(device)) as f:
            return f.get_tensor(KEY)

    def append(self, t: Tensor) -> None:
        """Store the next micro-batch's hidden states: in memory while they fit under the limit."""
        self.layout.append((t.dtype, tuple(t.shape), t.device))
        size = t.numel() * t.element_size()
        if self.limit is None or self.held + size <= self.limit:
            self.memory.append(t)
            self.held += size
            return
        self.memory.append(None)
        self._write(len(self) - 1, t)

    def __setitem__(self, j: int, t: Tensor) -> None:
        if (t.dtype, tuple(t.shape)) != self.layout[j][:2]:
            given = (t.dtype, tuple(t.shape))
            raise CalibrationError(f"micro-batch {j} holds {self.layout[j][:2]}, not {given}")
        self.layout[j] = (t.dtype, tuple(t.shape), t.device)
        if self.memory[j] is not None:
            self.memory[j] = t
        else:
            self._write(j, t)

    def _write(self, j: int, t: Tensor) -> None:
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="lowbit-hidden-", dir=self.parent))
        tmp = self.dir / f".{j:05d}.tmp"
        save_file({KEY: t.detach().contiguous().cpu()}, str(tmp))
        os.replace(tmp, self._path(j))

    @property
    def offloaded(self) -> int:
        """How many micro-batches are kept on disk."""
        return sum(m is None for m in self.memory)

    def close(self) -> None:
        """Remove the files (the states in memory stay readable)."""
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> HiddenStates:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
