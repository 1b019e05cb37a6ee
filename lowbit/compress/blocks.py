"""Block providers: where the compress pipeline's decoder blocks come from (`BlockProvider` in
`lowbit.calibration.sequential`).

`StreamedFolder` streams a safetensors folder block by block. The model is a skeleton on the meta device
(`lowbit.models.folder.folder_skeleton`: non-persistent
buffers such as rotary frequencies real, moved to the job's device). `materialise(i)` reads decoder block
i's tensors from the shards (each with one `readinto` into its own storage, in the load dtype, then moved
to the device) and assigns them; `release(i)` puts every tensor of the block back on the meta device, so
its memory is freed (a block replaced by compressed layers meanwhile releases those). `materialise(None)`
and `release(None)` do the same for the tensors outside the blocks (embeddings, final norm, lm_head).
`on_demand()` runs the whole model's forward with each block read just before it runs and released right
after (capturing the first block's inputs, finding the norms' readers). `folds`: functions called with
the index (or None) each time a part has been read, before anything uses it: the recipe's rotations
(`lowbit.compress.rotation.BlockRotation`), so every reader sees the rotated weights.

`InMemory` is the same interface over a model that is already whole (built-in GGUF models, nn.Module
inputs): nothing is read or freed. `most_live` counts the blocks materialised at once, the memory bound
the tests check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from lowbit.calibration.stats import find_blocks
from lowbit.compress.memory import release_freed_memory
from lowbit.models.folder import read_tensors


class InMemory:
    """The block provider of a model already in memory: every call is a no-op."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.most_live = 0

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def materialise(self, index: int | None) -> None:
        pass

    def release(self, index: int | None) -> None:
        pass

    @contextlib.contextmanager
    def on_demand(self) -> Iterator[None]:
        yield


class StreamedFolder:
    """The block provider of a safetensors folder (see the module docstring)."""

    def __init__(self, model: nn.Module, headers: dict, dtype: torch.dtype, device: torch.device):
        self.model, self.headers, self.dtype, self.device = model, headers, dtype, device
        self.prefix, self.blocks = find_blocks(model)
        self.live: set[int] = set()
        self.most_live = 0
        self.folds: list[Callable[[int | None], None]] = []
        for m in model.modules():  # the real (non-persistent) buffers go to the job's device now
            for k, b in m._buffers.items():
                if b is not None and b.device.type != "meta":
                    m._buffers[k] = b.to(device)

    def _names(self, index: int | None) -> list[str]:
        """Names of the model's state tensors in block `index` (None: outside every block)."""
        inside = f"{self.prefix}."
        if index is not None:
            return [n for n in self.model.state_dict() if n.startswith(f"{inside}{index}.")]
        return [n for n in self.model.state_dict() if not n.startswith(inside)]

    def materialise(self, index: int | None) -> None:
        """Read block `index` (None: the tensors outside the blocks) from the shards onto the device."""
        by_file: dict[Path, dict] = {}
        for name in self._names(index):
            if name in self.headers:  # a tied copy that the folder does not store is re-tied below
                f, entry = self.headers[name]
                by_file.setdefault(f, {})[name] = entry
        for f, header in by_file.items():
            self.model.load_state_dict(
                read_tensors(f, header, self.dtype, self.device), strict=False, assign=True
            )
        if index is None:
            self.model.tie_weights()
        else:
            self.live.add(index)
            self.most_live = max(self.most_live, len(self.live))
        for fold in self.folds:
            fold(index)

    def release(self, index: int | None) -> None:
        """Put every state tensor of block `index` (None: outside the blocks) back on the meta device, and
        hand the freed memory back to the system."""
        for name in self._names(index):
            owner, _, leaf = name.rpartition(".")
            m = self.model.get_submodule(owner)
            if leaf in m._parameters:
                p = m._parameters[leaf]
                m._parameters[leaf] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
            else:
                m._buffers[leaf] = m._buffers[leaf].to("meta")
        if index is None:
            self.model.tie_weights()
        self.live.discard(index)
        release_freed_memory()  # the block's tensors, and whatever its pass freed with them

    @contextlib.contextmanager
    def on_demand(self) -> Iterator[None]:
        """The outside tensors materialised, and each block materialised when called and released after."""

        def pre(i, *_):
            self.materialise(i)

        def post(i, *_):
            self.release(i)

        self.materialise(None)
        hooks = []
        for i, block in enumerate(self.blocks):
            hooks.append(block.register_forward_pre_hook(lambda *a, i=i: pre(i)))
            hooks.append(block.register_forward_hook(lambda *a, i=i: post(i)))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            for i in list(self.live):
                self.release(i)  # a forward stopped inside a block (the capture's early exit)
            self.release(None)
