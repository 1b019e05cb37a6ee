"""Data-parallel fine-tuning over the job's processes (`lowbit.parallel`) with torch's
DistributedDataParallel (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel
Training"): every rank holds the whole model and the same trained tensors, computes the loss on its share
of each step's batch, and DDP averages the gradients over the ranks during the backward pass, so every
rank's optimizer takes the same step.

The global batch is the one a single process would draw (`batch_indices`); rank r computes the mean loss
l_r over its n_r of the B blocks (`lowbit.parallel.share`) and backpropagates l_r * n_r * R / B, so that
DDP's average over the R ranks is the gradient of sum_r (n_r / B) l_r: the mean over the whole batch, as
one process computes it (sizes that differ by one block included). Only the summation order differs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lowbit.compress.finetune.config import FinetuneError
from lowbit.parallel import World, broadcast_tensors, share


def check_batch(batch_size: int, w: World) -> None:
    """Every rank needs at least one block of each step's batch (DDP's backward runs on every rank)."""
    if batch_size < w.size:
        raise FinetuneError(
            f"finetune batch_size {batch_size} is smaller than the number of processes ({w.size}); "
            "each process takes its share of every batch"
        )


def local_part(indices: torch.Tensor, w: World) -> tuple[torch.Tensor, float]:
    """(this rank's share of a step's block indices [B], the factor of its mean loss in the backward pass:
    n_r * R / B, 1.0 for one process)."""
    part = indices[share(len(indices), w)]
    return part, len(part) * w.size / len(indices)


def data_parallel(model: nn.Module, params: dict[str, nn.Parameter], w: World) -> nn.Module:
    """`model` wrapped in DistributedDataParallel over the trained tensors `params` (the model itself for
    one process).

    Rank 0's trained tensors are broadcast first, so every rank starts from the same values; the frozen
    weights are the same on every rank already (the same compressed model), so DDP's own start-up
    broadcast of the whole model and its per-forward broadcast of the buffers are turned off. NCCL jobs
    compute on this rank's GPU (`device_ids`).
    """
    if w.size == 1:
        return model
    ours = {n: p.detach() for n, p in params.items()}
    theirs, _ = broadcast_tensors(ours if w.main else None, {}, 0, w)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(theirs[name])
    device = torch.device(w.device)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False, init_sync=False)
