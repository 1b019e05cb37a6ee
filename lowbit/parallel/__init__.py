"""Several processes on one job: which rank does what, and the tensors that travel between ranks.

Under `torchrun --nproc_per_node N` (or `lowbit compress --nproc N`, which launches it) every rank
runs the same pipeline over its own share of the calibration samples. The per-layer statistics are
summed over the ranks (`lowbit.calibration.stats.reduce_stats`), so every rank holds what a single
process would have collected; each layer's work (GPTQ, decomposition) is then done by one owner rank,
chosen by size so the ranks finish together (`owners`), and its result broadcast to the others
(`broadcast_tensors`); rank 0 writes the output. NCCL carries the collectives on GPUs, gloo on CPUs.

Tensors travel as safetensors bytes (never pickle), with a JSON document beside them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors


class ParallelError(ValueError):
    """The processes cannot work together as asked (bad environment, mismatched ranks)."""


@dataclass(frozen=True)
class World:
    """This process's place among the job's processes.

    rank: 0..size-1; size: number of processes; device: where collective tensors live (a CUDA
    device under NCCL, the CPU under gloo).
    """

    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0


SINGLE = World()  # a job of one process


def world() -> World:
    """The current job's World: one process unless torch.distributed is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    return World(dist.get_rank(), dist.get_world_size(), device)


def launched_size() -> int:
    """How many processes the launcher (torchrun) started, from its WORLD_SIZE variable (1 without one)."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ParallelError(f"WORLD_SIZE must be a positive integer, got {value!r}")
    return int(value)


@contextlib.contextmanager
def processes(device: str | torch.device | None = None) -> Iterator[World]:
    """Join the process group torchrun set up (NCCL when `device` is a CUDA device, else gloo) for the
    duration of the block; one process when the launcher started one (or none). Each rank of a CUDA job
    takes the GPU numbered by its LOCAL_RANK. An already initialised group is used and left open."""
    if launched_size() == 1 or dist.is_initialized():
        yield world()
        return
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield world()
    finally:
        dist.destroy_process_group()


def rank_device(device: str | torch.device | None, w: World) -> str | torch.device | None:
    """The device this rank computes on: its own GPU in a CUDA job (`cuda` becomes `cuda:LOCAL_RANK`)."""
    if w.size > 1 and device is not None and torch.device(device).type == "cuda":
        return w.device
    return device


def share(n: int, w: World) -> slice:
    """The contiguous part of n samples that rank w.rank works on: sizes differ by at most one, in
    rank order, so the ranks' parts, concatenated, are the samples in order."""
    base, extra = divmod(n, w.size)
    start = w.rank * base + min(w.rank, extra)
    return slice(start, start + base + (w.rank < extra))


def owners(costs: dict[str, float], size: int) -> dict[str, int]:
    """{task: rank}: each task to the least loaded rank, largest tasks first (longest processing time
    first, Graham 1969: the busiest rank ends within 4/3 of the best balance). Deterministic: ties
    go by name, then to the lowest rank, so every rank computes the same assignment."""
    if size < 1:
        raise ParallelError(f"size must be >= 1, got {size}")
    load = [0.0] * size
    result = {}
    for name in sorted(costs, key=lambda k: (-costs[k], k)):
        rank = min(range(size), key=lambda r: (load[r], r))
        result[name] = rank
        load[rank] += costs[name]
    return result


def all_reduce(t: torch.Tensor, op: str, w: World) -> torch.Tensor:
    """t reduced over the ranks ('sum' or 'max'), in place on t (which keeps its device and dtype)."""
    if w.size == 1:
        return t
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ParallelError(f"op must be one of {sorted(ops)}, got {op!r}")
    buf = t.to(w.device)
    dist.all_reduce(buf, ops[op])
    if buf is not t:
        t.copy_(buf)
    return t


def broadcast_bytes(data: bytes | None, src: int, w: World) -> bytes:
    """The bytes rank `src` passes (others pass None), on every rank."""
    if w.size == 1:
        return data
    size = torch.tensor([len(data) if w.rank == src else 0], dtype=torch.int64, device=w.device)
    dist.broadcast(size, src)
    if w.rank == src:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(w.device)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=w.device)
    dist.broadcast(buf, src)
    return data if w.rank == src else bytes(buf.cpu().numpy())


def broadcast_tensors(
    tensors: dict[str, torch.Tensor] | None, meta: dict | None, src: int, w: World
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON document) that rank `src` passes, on every rank, as CPU tensors (others pass None).

    The owner's tensors come back unchanged on the owner itself, so owner and receivers hold the same
    values bit for bit."""
    if w.size == 1:
        return tensors, meta
    if w.rank == src:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        data = save_tensors(cpu, metadata={"meta": json.dumps(meta)})
    else:
        data = None
    data = broadcast_bytes(data, src, w)
    if w.rank == src:
        return tensors, meta
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return load_tensors(data), json.loads(header["__metadata__"]["meta"])


def barrier(w: World) -> None:
    """Wait until every rank gets here."""
    if w.size > 1:
        dist.barrier()
