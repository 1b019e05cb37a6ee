"""A fine-tuning run's configuration and report, and the modes and objectives it may name."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from lowbit.compress.finetune.fakequant import LATENTS

MODES = ("lora", "peqa", "l4q", "lsq")
CALIBRATION = "calibration"  # `data`: the job's calibration text, at fine-tuning's samples and seq_len
OBJECTIVES = ("lm", "distill")
SCHEDULES = ("cosine", "constant")


class FinetuneError(ValueError):
    """Fine-tuning that cannot run as asked: bad config, no data, no teacher, incompatible saved state."""


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. `lr` is for low-rank factors, `scale_lr` for scales and zero points.

    objective: "lm", "distill" or None (distill when `data` is None, "teacher" or "calibration", else lm).
    data: a text source (see lowbit.calibration.data), "teacher" (sampled from the teacher), "calibration"
        (the compress job's calibration text, with this section's samples and seq_len; its token blocks
        when it was given as tokens), or None (the blocks passed to `finetune`). samples: blocks drawn
        from `data`.
    eval_every: steps between held-out evaluations (0: only at the start and the end); patience:
        evaluations without improvement before stopping (0: never stop early).
    latent: how l4q and lsq start from the teacher's weight W0 (`FakeQuantLinear`): "compressed" (the
        stored codes and scales, W0 clipped into the codes' rounding cells: training starts from the
        compressed model, GPTQ's codes included) or "original" (codes restarted by round-to-nearest of
        W0, as in L4Q; l4q also refits the scales). latent_inset: with "compressed", where the weights
        moved into a code's cell stop, as a fraction of the way from the cell's edge to its grid point
        (None: the mode's default, `lowbit.compress.finetune.fakequant.LATENT_INSET`).
    rank: LoRA rank of l4q. adapter_rank: lora gives the layers without low-rank factors new ones of this
        rank (QLoRA); 0 leaves them untrained. save_every: steps between saved states (0: only at the end).
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
    adapter_rank: int = 0
    latent: str = "compressed"
    latent_inset: float | None = None
    hidden_weight: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 0
    gradient_checkpointing: bool = True

    def __post_init__(self) -> None:
        for name, choices in (("mode", MODES), ("schedule", SCHEDULES), ("latent", LATENTS)):
            if getattr(self, name) not in choices:
                raise FinetuneError(
                    f"unknown finetune {name} {getattr(self, name)!r}; choose one of {choices}"
                )
        if self.objective not in (None, *OBJECTIVES):
            raise FinetuneError(f"unknown finetune objective {self.objective!r}; choose one of {OBJECTIVES}")
        minimum = dict(steps=1, batch_size=1, seq_len=2, samples=1, rank=1)
        minimum.update(dict.fromkeys(("seed", "eval_every", "eval_blocks", "patience", "warmup"), 0))
        minimum["save_every"] = minimum["adapter_rank"] = 0
        for name, lo in minimum.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise FinetuneError(f"finetune {name} must be an integer >= {lo}, got {v!r}")
        for name in ("lr", "scale_lr", "hidden_weight", "weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise FinetuneError(f"finetune {name} must be a non-negative number, got {v!r}")
        inset = self.latent_inset
        if inset is not None and (
            not isinstance(inset, (int, float)) or isinstance(inset, bool) or not 0 <= inset < 1
        ):
            raise FinetuneError(f"finetune latent_inset must be a number in [0, 1) or null, got {inset!r}")
        if self.lr <= 0 or self.scale_lr <= 0:
            raise FinetuneError("finetune lr and scale_lr must be positive")

    def resolved_objective(self) -> str:
        return self.objective or ("distill" if self.data in (None, "teacher", CALIBRATION) else "lm")

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
