"""The training loop: AdamW on the trained tensors, learning-rate schedule, held-out evaluation with
early stopping, saving and resuming; `finetune` ties the stages together."""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.compress.finetune.config import FinetuneConfig, FinetuneError, FinetuneReport
from lowbit.compress.finetune.ddp import check_batch, data_parallel, local_part
from lowbit.compress.finetune.fakequant import FakeQuantLinear
from lowbit.compress.finetune.layers import _restore_layers, export_layers, prepare_layers, trainable_tensors
from lowbit.compress.finetune.objectives import _device, batch_indices, objective_loss, training_blocks
from lowbit.compress.finetune.state import TrainState, _digest, load_state, save_state
from lowbit.nn.qlinear import QLinear
from lowbit.parallel import World, all_reduce, barrier, share, world

SCALE_PARAMS = ("s", "z")


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the learning rate at `step` (0-based): linear warmup, then cosine to 0 or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def _evaluate(model, teacher, held: torch.Tensor, config: FinetuneConfig, w: World) -> float:
    """Mean held-out loss over the blocks held [E, L]; each rank evaluates its share of them and the sums
    are added over the ranks, so every rank gets the same number."""
    model.eval()
    total = 0.0
    part = held[share(len(held), w)]
    with torch.no_grad():
        for i in range(0, len(part), config.batch_size):
            x = part[i : i + config.batch_size].to(_device(model))
            loss = objective_loss(model, teacher, x, config.resolved_objective(), config.hidden_weight)
            total += loss.item() * len(x)
    return all_reduce(torch.tensor([total], dtype=torch.float64), "sum", w).item() / len(held)


def _record_eval(st: TrainState, loss: float, params: dict, patience: int) -> None:
    st.evals.append([st.step, loss])
    if loss < st.best_loss:
        st.best_loss, st.best_step, st.bad_evals = loss, st.step, 0
        if patience:
            st.best = {n: p.detach().clone() for n, p in params.items()}
    else:
        st.bad_evals += 1
        st.stopped = bool(patience) and st.bad_evals >= patience


def _checkpointing(model: nn.Module, enable: bool) -> bool:
    """Turn activation checkpointing on or off where the model supports it; return whether it is on."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return False
    if enable:
        on = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        on()
        return True
    off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    off()
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    return False


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _step(model, teacher, x, factor: float, params: dict, opt, config: FinetuneConfig, w: World) -> float:
    """One optimizer step on this rank's blocks x [b, L]; returns the loss over the whole batch.

    factor: this rank's weight in the batch's mean loss times the number of ranks (`local_part`), which
    DDP's average of the gradients over the ranks divides again."""
    model.train()
    loss = objective_loss(model, teacher, x, config.resolved_objective(), config.hidden_weight)
    total = all_reduce(loss.detach().double().reshape(1) * (factor / w.size), "sum", w)  # on every rank
    if not torch.isfinite(total).all():
        raise FinetuneError("training loss is NaN/Inf; lower lr or scale_lr")
    opt.zero_grad(set_to_none=True)
    (loss * factor).backward()
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
    opt.step()
    return total.item()


def _train(model, teacher, train, held, params, opt, st: TrainState, config, save, callback, progress):
    """The training loop from st.step to config.steps (or an early stop); updates st in place and
    returns the seconds spent in training steps (evaluations and saving left out). Under several
    processes each step runs data-parallel (`lowbit.compress.finetune.ddp`)."""
    step_seconds = 0.0
    w = world()
    show = progress and w.main
    bar = tqdm(total=config.steps, initial=st.step, desc=f"finetune {config.mode}", disable=not show)
    device = _device(model)
    ddp = data_parallel(model, params, w)
    try:
        while st.step < config.steps and not st.stopped:
            factor = lr_factor(st.step, config.steps, config.warmup, config.schedule)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
            part, weight = local_part(batch_indices(st.step, len(train), config.batch_size, config.seed), w)
            t0 = time.perf_counter()
            loss = _step(ddp, teacher, train[part].to(device), weight, params, opt, config, w)
            step_seconds += time.perf_counter() - t0
            st.step += 1
            st.losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
            last = st.step == config.steps
            if held is not None and (last or (config.eval_every and st.step % config.eval_every == 0)):
                _record_eval(st, _evaluate(model, teacher, held, config, w), params, config.patience)
            if save is not None and (
                last or st.stopped or (config.save_every and st.step % config.save_every == 0)
            ):
                save(st)
            if callback is not None:
                callback(st.step, loss)
    finally:
        bar.close()
    return step_seconds


def _optimizer(params: dict, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW with two groups: scales and zero points at scale_lr, every other trained tensor at lr."""
    groups = []
    for lr, want in ((config.lr, False), (config.scale_lr, True)):
        ps = [p for n, p in params.items() if (n.rsplit(".", 1)[1] in SCALE_PARAMS) == want]
        if ps:
            groups.append({"params": ps, "lr": lr, "base_lr": lr})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def _fit(model, teacher, train, held, params, opt, config, state_dir, meta, callback, progress):
    """Train from scratch or from the state in state_dir; restore the best tensors when early stopping
    is on. Returns (state, first step of this call, seconds spent in training steps)."""
    device, w = _device(model), world()
    writes = state_dir is not None and w.main  # every rank reads the state, rank 0 alone writes it
    save = (lambda st: save_state(state_dir, params, opt, st, meta)) if writes else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        st = None if state_dir is None else load_state(state_dir, params, opt, meta)
        barrier(w)  # every rank has read the state before rank 0 writes the next one
        start = 0 if st is None else st.step
        if st is None:
            st = TrainState()
            if held is not None:
                _record_eval(st, _evaluate(model, teacher, held, config, w), params, config.patience)
        checkpointing = config.gradient_checkpointing and _checkpointing(model, True)
        try:
            step_seconds = _train(
                model, teacher, train, held, params, opt, st, config, save, callback, progress
            )
        finally:
            if checkpointing:
                _checkpointing(model, False)
    if st.best and st.best_step != st.step:
        with torch.no_grad():
            for name, t in st.best.items():
                params[name].copy_(t)
    return st, start, step_seconds


def finetune(
    model: nn.Module,
    teacher: nn.Module | None = None,
    *,
    config: FinetuneConfig,
    blocks: torch.Tensor | None = None,
    tokenizer=None,
    state_dir: str | Path | None = None,
    callback: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> FinetuneReport:
    """Fine-tune the QLinear layers of `model` in place as `config.mode` says; return the report.

    teacher: the original dense model (needed by the distill objective; gives l4q and lsq their latent
    weights). blocks: LongTensor [S, L] of training tokens when config.data is None. state_dir: where the
    run's state is saved and resumed from. callback(step, loss) runs after every step. If training fails,
    the model is left as it was.
    """
    t0 = time.perf_counter()
    objective = config.resolved_objective()
    if objective == "distill" and teacher is None:
        raise FinetuneError("the distill objective needs the teacher (the original model)")
    if teacher is not None:
        teacher.eval()
    check_batch(config.batch_size, world())
    data = training_blocks(config, blocks, tokenizer, teacher)
    n_held = config.eval_blocks
    train, held = data[: len(data) - n_held], (data[len(data) - n_held :] if n_held else None)
    device = _device(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    originals = {n: (m.l1, m.l2) for n, m in model.named_modules() if isinstance(m, QLinear) and m.rank}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    layers, exported = {}, False
    try:
        layers = prepare_layers(
            model,
            config.mode,
            teacher,
            config.rank,
            config.seed,
            config.adapter_rank,
            config.latent,
            config.latent_inset,
        )
        params = trainable_tensors(layers)
        opt = _optimizer(params, config)
        meta = {  # what a saved state must match to be resumed
            "config": {k: v for k, v in config.to_dict().items() if k != "save_every"},
            "data_sha256": _digest(data),
            "params": {n: list(p.shape) for n, p in params.items()},
        }
        st, start, step_seconds = _fit(
            model, teacher, train, held, params, opt, config, state_dir, meta, callback, progress
        )
        plan = export_layers(model, layers, originals)
        exported = True
    finally:
        if not exported:
            _restore_layers(model, layers, originals)
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, True))
        model.train(was_training)
    seconds = time.perf_counter() - t0
    return FinetuneReport(
        mode=config.mode,
        objective=objective,
        steps=st.step,
        start_step=start,
        trainable_params=sum(p.numel() for p in params.values()),
        trained_layers=sum(1 for q, m in layers.values() if isinstance(m, FakeQuantLinear) or q.rank),
        losses=st.losses,
        evals=st.evals,
        best_step=st.best_step,
        stopped_early=st.stopped,
        seconds=seconds,
        seconds_per_step=step_seconds / max(1, st.step - start),
        peak_memory_bytes=_peak_memory(device),
        plan=plan,
    )
