"""A streamed compress job: a safetensors folder compressed one decoder block at a time, resumable.

The source is a skeleton on the meta device (`lowbit.models.stream`); `quantize_model` materialises each
block in turn, compresses it, and hands it to `StreamedJob.done`, which writes the block's final tensors
to the work area as one part file (`parts/block-0000i.safetensors`, the per-layer plan and stored bits in
its metadata) and releases it. Parts are packed into shards (`shards/0000k.safetensors`) as soon as the
waiting ones reach the maximum shard size, so the output is written while blocks finish and at most one
shard's worth of parts waits on disk. Last come the tensors outside the blocks (`parts/outside`).
`finish` packs what is left and moves the shards into the checkpoint's temporary folder under their
final names (`model-0000k-of-0000n.safetensors`: n is known only then; one shard is `model.safetensors`).

Resume: with calibration the hidden states entering the next block are saved before each part
(`hidden-0000i.safetensors`, the outputs of block i), and the previous ones removed after it, so a kill at
any point leaves the parts of blocks 0..i-1 and the inputs of block i. A new run of the same job (same
model, recipe, dtype, device and shard size: the work area's key) starts at the first block without a
part; every block is computed from the same inputs as in an uninterrupted run, so the result is
identical bit for bit. A part that a shard already holds (a kill between writing the shard and removing
its parts) is removed on resume.

Past the recipe's calibration.max_hidden_memory the hidden states between two blocks are kept in a
temporary folder inside the work area (`lowbit.calibration.hidden`), and the resume file is written from
them one micro-batch at a time.

LOWBIT_TEST_KILL_AFTER_BLOCK=i (a testing hook, not a setting) kills the process with SIGKILL right after
block i's part is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from lowbit.calibration.hidden import HiddenStates
from lowbit.compress.workarea import WorkArea, job_key
from lowbit.models.folder import read_tensors
from lowbit.nn.atomic import hold_lock
from lowbit.nn.checkpoint import plan_bits, saveable_state
from lowbit.nn.manifest import lowbit_version, read_safetensors_header
from lowbit.nn.qlinear import QLinear
from lowbit.nn.shards import DTYPES, finish_shards, write_safetensors
from lowbit.parallel import SINGLE, World, barrier

KILL_AFTER = "LOWBIT_TEST_KILL_AFTER_BLOCK"
OUTSIDE = "outside"  # the part of the tensors outside the decoder blocks


def part_name(index: int | None) -> str:
    return OUTSIDE if index is None else f"block-{index:05d}"


class SavedHidden(Sequence):
    """The hidden states a killed run saved after a block, one [B, L, D] per micro-batch, each read from
    the file when asked for (a resumed run holds no more of them in memory than an uninterrupted one)."""

    def __init__(self, path: Path):
        self.path = path
        with safe_open(str(path), framework="pt") as f:
            self.n = len(f.keys())

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> torch.Tensor:
        if not 0 <= j < self.n:
            raise IndexError(j)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(str(j))


class StreamedJob:
    """The `lowbit.compress.uniform.Stream` of a block provider over a work area (module docstring)."""

    def __init__(self, provider, work: WorkArea, max_shard_bytes: int, ranks: World = SINGLE):
        self.provider, self.model, self.max_shard_bytes = provider, provider.model, max_shard_bytes
        self.parts, self.shards = work.path("parts"), work.path("shards")
        self.work, self.area, self.ranks = work.dir, work, ranks
        if ranks.main:
            self.parts.mkdir(exist_ok=True)
            self.shards.mkdir(exist_ok=True)
        barrier(ranks)  # the other processes read what rank 0 found
        self.plan, self.bits = {}, 0
        packed = set()
        for shard in sorted(self.shards.glob("*.safetensors")):
            meta = read_safetensors_header(shard)["__metadata__"]
            packed.update(json.loads(meta["parts"]))
            self._account(meta)
        for part in self.parts.glob("*.safetensors"):
            if part.stem in packed:  # already in a shard: a kill came before its removal
                if ranks.main:
                    part.unlink()
            else:
                self._account(read_safetensors_header(part)["__metadata__"])
        finished = packed | {p.stem for p in self.parts.glob("*.safetensors")}
        n = len(provider.blocks)
        self.start = next((i for i in range(n) if part_name(i) not in finished), n)
        self.hidden = self._load_hidden(self.start - 1) if self.start else None
        barrier(ranks)  # every process has read the work area before rank 0 changes it

    def _account(self, meta: dict) -> None:
        self.plan.update(json.loads(meta["plan"]))
        self.bits += int(meta["bits"])

    def _hidden_path(self, index: int) -> Path:
        """The saved inputs of block index + 1 (each process keeps those of its share of the samples)."""
        rank = f"-rank{self.ranks.rank}" if self.ranks.size > 1 else ""
        return self.work / f"hidden-{index:05d}{rank}.safetensors"

    def _load_hidden(self, index: int) -> SavedHidden | None:
        path = self._hidden_path(index)
        if not path.is_file():
            return None  # a job without calibration saves none
        return SavedHidden(path)

    def done(self, index: int | None, hidden: HiddenStates | None) -> None:
        """Write block `index`'s part (None: the tensors outside the blocks), after the inputs of the next
        block when there are any (one micro-batch in memory at a time: some may be on disk); then pack
        full shards."""
        if hidden is not None:
            layout = {str(j): (dtype, shape) for j, (dtype, shape, _) in enumerate(hidden.layout)}
            write_safetensors(self._hidden_path(index), layout, lambda key: hidden[int(key)])
        prefix = self.provider.prefix
        inside = f"{prefix}.{index}." if index is not None else None
        state = {
            k: v
            for k, v in self.model.state_dict().items()
            if (k.startswith(inside) if inside else not k.startswith(prefix + "."))
        }
        state = saveable_state(state)
        owner = self.provider.blocks[index] if index is not None else self.model
        base = inside or ""
        plan = {
            base + name: m.layer_plan()
            for name, m in owner.named_modules()
            if isinstance(m, QLinear) and (inside or not (base + name).startswith(prefix + "."))
        }
        bits = plan_bits(self.model, plan)
        self.plan.update(plan)
        self.bits += bits
        # every process holds the same block; rank 0 writes it once all saved their hidden states, and
        # each removes its previous ones once the part is written: a kill leaves a state to resume from
        barrier(self.ranks)
        if self.ranks.main:
            meta = {"plan": json.dumps(plan), "bits": str(bits)}
            layout = {k: (t.dtype, tuple(t.shape)) for k, t in state.items()}
            write_safetensors(self.parts / f"{part_name(index)}.safetensors", layout, state.get, meta)
            self.area.check_size()
        barrier(self.ranks)
        if index is not None and index > 0:
            self._hidden_path(index - 1).unlink(missing_ok=True)
        if index is not None and os.environ.get(KILL_AFTER) == str(index):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.ranks.main:
            self._pack(final=False)

    def _pack(self, final: bool) -> None:
        """Pack the waiting parts, in order, into shards of about max_shard_bytes (parts are not split: a
        shard holds whole blocks); with final=False only once they fill a shard."""
        waiting = sorted(self.parts.glob("*.safetensors"), key=lambda p: (p.stem == OUTSIDE, p.stem))
        group, size = [], 0
        for part in waiting:
            part_bytes = part.stat().st_size
            if group and size + part_bytes > self.max_shard_bytes:
                self._write_shard(group)
                group, size = [], 0
            group.append(part)
            size += part_bytes
        if group and (final or size >= self.max_shard_bytes):
            self._write_shard(group)

    def _write_shard(self, parts: list[Path]) -> None:
        """One shard from the parts (each tensor read when its turn comes), then the parts removed."""
        layout, where, plan, bits = {}, {}, {}, 0
        for part in parts:
            header = read_safetensors_header(part)
            meta = header.pop("__metadata__")
            plan.update(json.loads(meta["plan"]))
            bits += int(meta["bits"])
            for name, v in header.items():
                layout[name] = (DTYPES[v["dtype"]], tuple(v["shape"]))
                where[name] = (part, v)

        def tensor(name: str) -> torch.Tensor:  # read, not memory-mapped: no page stays resident
            part, entry = where[name]
            return read_tensors(part, {name: entry}, None)[name]

        k = len(list(self.shards.glob("*.safetensors"))) + 1
        meta = {"parts": json.dumps([p.stem for p in parts]), "plan": json.dumps(plan), "bits": str(bits)}
        write_safetensors(self.shards / f"{k:05d}.safetensors", layout, tensor, meta)
        for part in parts:
            part.unlink()

    def finish(self, folder: Path) -> None:
        """Pack the parts left and move the shards into `folder` under their final names."""
        self._pack(final=True)
        finish_shards(sorted(self.shards.glob("*.safetensors")), folder)


@contextlib.contextmanager
def stream_work_area(
    model: str,
    recipe: dict,
    out: Path,
    work_dir,
    restart: bool,
    ranks: World = SINGLE,
    *,
    keep_work: bool = False,
    max_work_bytes: int | None = None,
    **settings,
):
    """The work area of a streamed job (`work_dir`, default `.lowbit-work` beside `out`), keyed by the
    model, the recipe, the number of processes and `settings` (dtype, device, shard size), locked
    against a second job by rank 0; removed once the body has finished without an error unless
    `keep_work` (a failed or killed job keeps it, and resumes). max_work_bytes: its size limit
    (`WorkArea.max_bytes`)."""
    job = {"model": model, "lowbit": lowbit_version(), "recipe": recipe, "stream": settings}
    if ranks.size > 1:  # each process saves the hidden states of its share: resumed by as many
        job["processes"] = ranks.size
    root = Path(work_dir) if work_dir is not None else Path(out).parent / ".lowbit-work"
    with hold_lock(root / job_key(job)) if ranks.main else contextlib.nullcontext():
        if ranks.main:
            work = WorkArea(root, job, restart=restart, max_bytes=max_work_bytes)
        barrier(ranks)
        if not ranks.main:
            work = WorkArea(root, job, max_bytes=max_work_bytes)
        yield work
        barrier(ranks)  # every process is done with the work area
    if keep_work or not ranks.main:
        return
    shutil.rmtree(work.dir)
    with contextlib.suppress(OSError):  # not empty: other jobs' files
        root.rmdir()
