"""Quantization-aware fine-tuning of a compressed model: a short run recovers what quantization lost.

    report = finetune(model, teacher, config=FinetuneConfig(mode="l4q", steps=200), blocks=calib_blocks)

`model` holds QLinear layers (any mix of formats and ranks); what trains depends on the mode, everything
else is frozen:

- lora (QLoRA, Dettmers et al. 2023; LQ-LoRA, Guo et al. 2024): the existing low-rank factors L1, L2.
  Q stays packed and is dequantized on the fly by the qlinear kernel, whose backward gives the factors'
  gradients. Layers of rank 0 train nothing; a model without low-rank factors is refused.
- peqa (PEQA, Kim et al. 2023): the per-group scales; codes and zero points stay bit-identical.
- l4q (L4Q, Jeon et al. 2024): LoRA factors B A (rank `config.rank`, B = 0 at the start) on the frozen
  latent W0 and LSQ step sizes, trained jointly through the quantizer; B A is then merged into the codes,
  so every layer ends as a purely quantized layer of rank 0 with the learned scales.
- lsq (LSQ, Esser et al. 2020): step sizes (and zero points of asymmetric INT) together with the low-rank
  factors; the codes are re-encoded with the learned scales, the low-rank part is kept.

The latent W0 of l4q and lsq is the teacher's dense weight of the same layer when a teacher is given
(times the smoothing vector), else it is rebuilt from the layer as dequantize(Q) + L1 L2 (see
`FakeQuantLinear`). After training every QLinear holds a valid packed QTensor again and its
`layer_plan()` tells its rank; `FinetuneReport.plan` is the new per-layer plan.

Objectives: `lm`, next-token cross-entropy on the blocks; `distill`, KL(teacher || student) of the
next-token distributions at temperature 1, plus `hidden_weight` times the mean over blocks of the MSE
between hidden states. Without training data (`data` None) the default is `distill` on the given blocks
(the calibration blocks); `data="teacher"` samples the training text from the teacher itself.

The last `eval_blocks` blocks are held out: evaluated every `eval_every` steps; with `patience` > 0 the
run stops after that many evaluations without improvement and the best tensors are restored. AdamW on
the trained tensors only (fp32), warmup then cosine or constant learning rate, gradient clipping,
activation checkpointing where the model supports it. With a `state_dir`, the trained tensors, AdamW's
moments, the step and the RNG state are written every `save_every` steps (safetensors + JSON) and a new
call with the same arguments resumes from them and ends with the same tensors as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration.data import calibration_blocks
from lowbit.compress.qlinear import FakeQuantLinear, QLinear, set_submodule

MODES = ("lora", "peqa", "l4q", "lsq")
OBJECTIVES = ("lm", "distill")
SCHEDULES = ("cosine", "constant")
STATE_TENSORS, STATE_META, STATE_VERSION = "finetune_state.safetensors", "finetune_state.json", 1
SCALE_PARAMS = ("s", "z")


class FinetuneError(ValueError):
    """Fine-tuning that cannot run as asked: bad config, no data, no teacher, incompatible saved state."""


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. `lr` is for low-rank factors, `scale_lr` for scales and zero points.

    objective: "lm", "distill" or None (distill when `data` is None or "teacher", else lm).
    data: a text source (see lowbit.calibration.data), "teacher" (sampled from the teacher), or None
        (the blocks passed to `finetune`). samples: blocks drawn from `data`.
    eval_every: steps between held-out evaluations (0: only at the start and the end); patience:
        evaluations without improvement before stopping (0: never stop early).
    rank: LoRA rank of l4q. save_every: steps between saved states (0: only at the end).
    """

    mode: str = "lora"
    objective: str | None = None
    steps: int = 100
    lr: float = 1e-4
    scale_lr: float = 1e-5
    batch_size: int = 4
    seq_len: int = 256
    data: str | None = None
    samples: int = 128
    seed: int = 0
    eval_every: int = 25
    eval_blocks: int = 4
    patience: int = 3
    warmup: int = 10
    schedule: str = "cosine"
    rank: int = 16
    hidden_weight: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 0
    gradient_checkpointing: bool = True

    def __post_init__(self) -> None:
        for name, choices in (("mode", MODES), ("schedule", SCHEDULES)):
            if getattr(self, name) not in choices:
                raise FinetuneError(
                    f"unknown finetune {name} {getattr(self, name)!r}; choose one of {choices}"
                )
        if self.objective not in (None, *OBJECTIVES):
            raise FinetuneError(f"unknown finetune objective {self.objective!r}; choose one of {OBJECTIVES}")
        minimum = dict(steps=1, batch_size=1, seq_len=2, samples=1, rank=1)
        minimum.update(dict.fromkeys(("seed", "eval_every", "eval_blocks", "patience", "warmup"), 0))
        minimum["save_every"] = 0
        for name, lo in minimum.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise FinetuneError(f"finetune {name} must be an integer >= {lo}, got {v!r}")
        for name in ("lr", "scale_lr", "hidden_weight", "weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise FinetuneError(f"finetune {name} must be a non-negative number, got {v!r}")
        if self.lr <= 0 or self.scale_lr <= 0:
            raise FinetuneError("finetune lr and scale_lr must be positive")

    def resolved_objective(self) -> str:
        return self.objective or ("distill" if self.data in (None, "teacher") else "lm")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        if not isinstance(d, dict):
            raise FinetuneError("the finetune section must be a mapping")
        if unknown := set(d) - {f.name for f in fields(cls)}:
            raise FinetuneError(f"unknown finetune key(s): {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass
class FinetuneReport:
    """What a fine-tuning run did. losses: training loss of every step (resumed steps included); evals:
    [step, held-out loss] pairs; peak_memory_bytes: GPU peak allocated, or the process's peak RSS."""

    mode: str
    objective: str
    steps: int = 0
    start_step: int = 0
    trainable_params: int = 0
    trained_layers: int = 0
    losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    best_step: int | None = None
    stopped_early: bool = False
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    peak_memory_bytes: int = 0
    plan: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


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


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


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


def prepare_layers(
    model: nn.Module, mode: str, teacher: nn.Module | None = None, rank: int = 16, seed: int = 0
) -> dict[str, tuple[QLinear, nn.Module]]:
    """Put every QLinear of `model` in its training form for `mode`; return {fqn: (QLinear, trained)}.

    lora: the QLinear itself with fp32 factors; other modes: a FakeQuantLinear swapped in by name. Every
    parameter of the model is frozen except the trained ones (`trainable_tensors`).
    """
    if mode not in MODES:
        raise FinetuneError(f"unknown finetune mode {mode!r}; choose one of {MODES}")
    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    if not qlinears:
        raise FinetuneError("the model has no QLinear layer to fine-tune; compress it first")
    if mode == "lora" and not any(m.rank for m in qlinears.values()):
        raise FinetuneError("mode lora trains low-rank factors, but every layer has rank 0")
    model.requires_grad_(False)  # trainable_tensors turns the trained ones back on
    generator = torch.Generator().manual_seed(seed)
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = torch.float32 if first is None else first.dtype
    if mode != "lora":  # every training form is built before the first swap: a failure changes nothing
        layers = {
            fqn: (m, FakeQuantLinear(m, mode, _dense_weight(teacher, fqn, m), rank, generator, dtype))
            for fqn, m in qlinears.items()
        }
        for fqn, (_, fake) in layers.items():
            set_submodule(model, fqn, fake)
        return layers
    for m in qlinears.values():
        if m.rank:  # fp32 copies: the original factors stay as they were until export
            m.l1 = nn.Parameter(m.l1.detach().float().clone())
            m.l2 = nn.Parameter(m.l2.detach().float().clone())
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

    originals: {fqn: (l1, l2)} the low-rank factors before training (lora casts back to their dtype).
    """
    for fqn, (q, m) in layers.items():
        if isinstance(m, FakeQuantLinear):
            q.replace_weight(*m.export())
            set_submodule(model, fqn, q)
        elif q.rank:
            d = originals[fqn][0].dtype
            q.l1, q.l2 = nn.Parameter(q.l1.detach().to(d)), nn.Parameter(q.l2.detach().to(d))
    return {fqn: q.layer_plan() for fqn, (q, _) in layers.items()}


def _restore_layers(model: nn.Module, layers: dict, originals: dict) -> None:
    """Put the QLinears back as they were before training (training failed)."""
    for fqn, (q, m) in layers.items():
        if isinstance(m, FakeQuantLinear):
            set_submodule(model, fqn, q)
        elif q.rank:
            q.l1, q.l2 = originals[fqn]


def objective_loss(
    model: nn.Module, teacher: nn.Module | None, x: torch.Tensor, objective: str, hidden_weight: float = 0.0
) -> torch.Tensor:
    """Mean loss of `model` on token blocks x [B, L]: next-token CE (lm) or KL(teacher || student)."""
    hidden = objective == "distill" and hidden_weight > 0
    out = model(input_ids=x, use_cache=False, output_hidden_states=hidden)
    logits = out.logits.float()  # [B, L, V]
    V = logits.shape[-1]
    if objective == "lm":
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    with torch.no_grad():
        t = teacher(input_ids=x, use_cache=False, output_hidden_states=hidden)
    if t.logits.shape[-1] != V:
        raise FinetuneError(f"teacher has {t.logits.shape[-1]} logits per token, the model {V}")
    log_p = F.log_softmax(t.logits.float().reshape(-1, V), dim=-1)  # teacher, [B * L, V]
    log_q = F.log_softmax(logits.reshape(-1, V), dim=-1)
    loss = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")  # per token
    if hidden:
        pairs = list(zip(out.hidden_states[1:], t.hidden_states[1:], strict=True))
        loss = loss + hidden_weight * sum(F.mse_loss(h.float(), g.float()) for h, g in pairs) / len(pairs)
    return loss


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the learning rate at `step` (0-based): linear warmup, then cosine to 0 or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Blocks of `step`: the step-th slice of a stream of per-epoch random permutations of range(n).

    A pure function of its arguments, so a resumed run draws the same batches.
    """
    start = step * batch_size
    out, perms = [], {}
    for i in range(start, start + batch_size):
        epoch, pos = divmod(i, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(perms[epoch][pos])
    return torch.stack(out)


@torch.no_grad()
def sample_blocks(teacher: nn.Module, n: int, seq_len: int, bos_id: int, seed: int = 0) -> torch.Tensor:
    """n blocks of seq_len tokens sampled from the teacher (temperature 1), each starting at bos_id."""
    g = torch.Generator().manual_seed(seed)
    device, blocks = _device(teacher), []
    teacher.eval()
    for i in range(0, n, 8):
        tokens = [torch.full((min(8, n - i), 1), bos_id, dtype=torch.long)]
        past = None
        for _ in range(seq_len - 1):
            out = teacher(input_ids=tokens[-1].to(device), past_key_values=past, use_cache=True)
            past = out.past_key_values
            probs = torch.softmax(out.logits[:, -1].float(), dim=-1).cpu()  # [b, V]
            tokens.append(torch.multinomial(probs, 1, generator=g))
        blocks.append(torch.cat(tokens, dim=1))
    return torch.cat(blocks)


def training_blocks(config: FinetuneConfig, blocks, tokenizer, teacher) -> torch.Tensor:
    """Token blocks [S, L] to train and evaluate on: from config.data when set, else `blocks`."""
    if config.data == "teacher":
        if teacher is None:
            raise FinetuneError("data 'teacher' samples text from the teacher, but no teacher was given")
        bos = getattr(tokenizer, "bos_token_id", None)
        bos = getattr(teacher.config, "bos_token_id", None) if bos is None else bos
        if bos is None:
            raise FinetuneError("cannot sample from the teacher: no BOS token id in tokenizer or config")
        blocks = sample_blocks(teacher, config.samples, config.seq_len, bos, config.seed)
    elif config.data is not None:
        if tokenizer is None:
            raise FinetuneError(f"finetune data {config.data!r} needs a tokenizer")
        blocks = calibration_blocks(tokenizer, config.data, config.samples, config.seq_len, seed=config.seed)
    elif blocks is None:
        raise FinetuneError("no training data: pass token blocks (e.g. the calibration blocks) or set data")
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.is_floating_point():
        raise FinetuneError("token blocks must be an integer tensor [blocks, tokens]")
    if blocks.shape[1] < 2 or blocks.shape[0] <= config.eval_blocks:
        raise FinetuneError(
            f"need more than eval_blocks={config.eval_blocks} blocks of >= 2 tokens, "
            f"got {tuple(blocks.shape)}"
        )
    return blocks[:, : config.seq_len].long()


def _evaluate(model, teacher, held: torch.Tensor, config: FinetuneConfig) -> float:
    """Mean held-out loss over the blocks held [E, L]."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(held), config.batch_size):
            x = held[i : i + config.batch_size].to(_device(model))
            loss = objective_loss(model, teacher, x, config.resolved_objective(), config.hidden_weight)
            total += loss.item() * len(x)
    return total / len(held)


def _record_eval(st: TrainState, loss: float, params: dict, patience: int) -> None:
    st.evals.append([st.step, loss])
    if loss < st.best_loss:
        st.best_loss, st.best_step, st.bad_evals = loss, st.step, 0
        if patience:
            st.best = {n: p.detach().clone() for n, p in params.items()}
    else:
        st.bad_evals += 1
        st.stopped = bool(patience) and st.bad_evals >= patience


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


def _step(model, teacher, x, params: dict, opt, config: FinetuneConfig) -> float:
    model.train()
    loss = objective_loss(model, teacher, x, config.resolved_objective(), config.hidden_weight)
    if not torch.isfinite(loss):
        raise FinetuneError("training loss is NaN/Inf; lower lr or scale_lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
    opt.step()
    return loss.item()


def _train(model, teacher, train, held, params, opt, st: TrainState, config, save, callback, progress):
    """The training loop from st.step to config.steps (or an early stop); updates st in place and
    returns the seconds spent in training steps (evaluations and saving left out)."""
    step_seconds = 0.0
    bar = tqdm(total=config.steps, initial=st.step, desc=f"finetune {config.mode}", disable=not progress)
    device = _device(model)
    try:
        while st.step < config.steps and not st.stopped:
            factor = lr_factor(st.step, config.steps, config.warmup, config.schedule)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
            x = train[batch_indices(st.step, len(train), config.batch_size, config.seed)].to(device)
            t0 = time.perf_counter()
            loss = _step(model, teacher, x, params, opt, config)
            step_seconds += time.perf_counter() - t0
            st.step += 1
            st.losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
            last = st.step == config.steps
            if held is not None and (last or (config.eval_every and st.step % config.eval_every == 0)):
                _record_eval(st, _evaluate(model, teacher, held, config), params, config.patience)
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
    device = _device(model)
    save = None if state_dir is None else (lambda st: save_state(state_dir, params, opt, st, meta))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        st = None if state_dir is None else load_state(state_dir, params, opt, meta)
        start = 0 if st is None else st.step
        if st is None:
            st = TrainState()
            if held is not None:
                _record_eval(st, _evaluate(model, teacher, held, config), params, config.patience)
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
        layers = prepare_layers(model, config.mode, teacher, config.rank, config.seed)
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
