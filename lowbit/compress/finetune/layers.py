"""Each mode's training form of the QLinear layers: prepared before training, exported (or restored)
after it."""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.compress.finetune.config import MODES, FinetuneError
from lowbit.compress.finetune.fakequant import FakeQuantLinear
from lowbit.nn.qlinear import QLinear, set_submodule


def _dense_weight(teacher: nn.Module | None, fqn: str, layer: QLinear) -> torch.Tensor | None:
    """The teacher's weight of layer `fqn` in the layer's smoothed domain W diag(smooth), or None."""
    if teacher is None:
        return None
    try:
        lin = teacher.get_submodule(fqn)
    except AttributeError:
        return None
    if not isinstance(lin, nn.Linear) or tuple(lin.weight.shape) != (layer.out_features, layer.in_features):
        return None
    W = lin.weight.detach().to(layer.codes.device, torch.float32)
    return W if layer.smooth is None else W * layer.smooth.float()[None, :]


# new adapters are stored like the decomposition's factors by default (DecomposeConfig.lowrank_dtype)
ADAPTER_DTYPE = torch.float16


def new_adapter(n: int, k: int, rank: int, generator: torch.Generator) -> tuple[nn.Parameter, nn.Parameter]:
    """QLoRA / LoRA initialisation (Hu et al. 2021, sec. 4.1) of factors L1 [n, rank] = 0 (the up
    projection B) and L2 [rank, k] Kaiming-uniform (the down projection A, bound 1 / sqrt(k)), fp32:
    L1 L2 = 0, so training starts from the compressed layer."""
    bound = 1.0 / math.sqrt(k)
    l2 = (torch.rand(rank, k, generator=generator) * 2 - 1) * bound
    return nn.Parameter(torch.zeros(n, rank)), nn.Parameter(l2)


def prepare_layers(
    model: nn.Module,
    mode: str,
    teacher: nn.Module | None = None,
    rank: int = 16,
    seed: int = 0,
    adapter_rank: int = 0,
    latent: str = "compressed",
    inset: float | None = None,
) -> dict[str, tuple[QLinear, nn.Module]]:
    """Put every QLinear of `model` in its training form for `mode`; return {fqn: (QLinear, trained)}.

    lora: the QLinear itself with fp32 factors, and new ones of `adapter_rank` (`new_adapter`) where it
    has none; other modes: a FakeQuantLinear swapped in by name (the latent of l4q and lsq: the teacher's
    weight, started from as `latent` and `inset` say). Every parameter of the model is frozen except the
    trained ones (`trainable_tensors`).
    """
    if mode not in MODES:
        raise FinetuneError(f"unknown finetune mode {mode!r}; choose one of {MODES}")
    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    if not qlinears:
        raise FinetuneError("the model has no QLinear layer to fine-tune; compress it first")
    if mode == "lora" and not adapter_rank and not any(m.rank for m in qlinears.values()):
        raise FinetuneError(
            "mode lora trains low-rank factors, but every layer has rank 0 (set adapter_rank to add them)"
        )
    model.requires_grad_(False)  # trainable_tensors turns the trained ones back on
    generator = torch.Generator().manual_seed(seed)
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = torch.float32 if first is None else first.dtype
    if mode != "lora":  # every training form is built before the first swap: a failure changes nothing
        options = (rank, generator, dtype, latent, inset)
        layers = {
            fqn: (m, FakeQuantLinear(m, mode, _dense_weight(teacher, fqn, m), *options))
            for fqn, m in qlinears.items()
        }
        for fqn, (_, fake) in layers.items():
            set_submodule(model, fqn, fake)
        return layers
    for m in qlinears.values():
        if m.rank:  # fp32 copies: the original factors stay as they were until export
            m.l1 = nn.Parameter(m.l1.detach().float().clone())
            m.l2 = nn.Parameter(m.l2.detach().float().clone())
        elif adapter_rank:
            l1, l2 = new_adapter(m.out_features, m.in_features, adapter_rank, generator)
            m.l1, m.l2 = nn.Parameter(l1.to(m.codes.device)), nn.Parameter(l2.to(m.codes.device))
            m.rank = adapter_rank
    return {fqn: (m, m) for fqn, m in qlinears.items()}


def trainable_tensors(layers: dict[str, tuple[QLinear, nn.Module]]) -> dict[str, nn.Parameter]:
    """The trained tensors by '{fqn}.{name}', in module order (names: l1, l2, s, z, lora_a, lora_b)."""
    out = {}
    for fqn, (_, m) in layers.items():
        for name, p in m.named_parameters():
            if name != "bias" and (name in ("l1", "l2") or isinstance(m, FakeQuantLinear)):
                p.requires_grad_(True)
                out[f"{fqn}.{name}"] = p
    return out


def export_layers(model: nn.Module, layers: dict[str, tuple[QLinear, nn.Module]], originals: dict) -> dict:
    """Write what was learned back into the QLinears, swap them in again; return the new plan.

    originals: {fqn: (l1, l2)} the low-rank factors before training (lora casts back to their dtype;
    new adapters are stored in ADAPTER_DTYPE).
    """
    for fqn, (q, m) in layers.items():
        if isinstance(m, FakeQuantLinear):
            q.replace_weight(*m.export())
            set_submodule(model, fqn, q)
        elif q.rank:
            d = originals[fqn][0].dtype if fqn in originals else ADAPTER_DTYPE
            q.l1, q.l2 = nn.Parameter(q.l1.detach().to(d)), nn.Parameter(q.l2.detach().to(d))
    return {fqn: q.layer_plan() for fqn, (q, _) in layers.items()}


def _restore_layers(model: nn.Module, layers: dict, originals: dict) -> None:
    """Put the QLinears back as they were before training (training failed)."""
    for fqn, (q, m) in layers.items():
        if isinstance(m, FakeQuantLinear):
            set_submodule(model, fqn, q)
        elif fqn in originals:
            q.l1, q.l2 = originals[fqn]
        elif q.rank:  # a new adapter
            q.l1 = q.l2 = None
            q.rank = 0
