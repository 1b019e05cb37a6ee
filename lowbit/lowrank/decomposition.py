"""The result of every decomposition, W ~ Q + L1 L2 (with optional SVDQuant smoothing), and its Q step.

Convention: a layer computes y = x_s @ (dequantize(q) + l1 @ l2).T with x_s = x / smooth, so
dequantize(q) + l1 @ l2 approximates W' = W * smooth[None, :] and the effective weight in the layer's
original input space is W_hat = (dequantize(q) + l1 @ l2) / smooth[None, :]. Without smoothing,
smooth is None and W_hat = dequantize(q) + l1 @ l2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.lowrank.error import delta_errors, output_error
from lowbit.lowrank.svd import hessian_svd_r
from lowbit.quantizers import QTensor, QuantSpec, dequantize, quantize
from lowbit.quantizers.gptq import gptq

# How a Q step rounds: name -> keyword arguments of `lowbit.quantizers.gptq.gptq` (None: round to nearest).
# "gptq" is the best variant measured (act-order, static groups fitted on the clip-searched weights);
# "gptq-noclip" fits them on W itself; "gptq-plain" is the reference algorithm without its flags (columns
# in their own order, each group fitted when the loop reaches it), kept as the ablation.
ROUNDINGS: dict[str, dict | None] = {
    "nearest": None,
    "gptq": {},
    "gptq-noclip": {"clip": False},
    "gptq-plain": {"act_order": False, "clip": False},
}
GPTQ_ROUNDS = 2  # LQ-LoRA's (Q <- GPTQ, L <- H-weighted SVD) rounds after its nearest-rounding alternation


class DecomposeError(ValueError):
    """A decomposition that cannot be computed as asked (unknown method, missing statistics, bad shapes)."""


@dataclass(frozen=True)
class Stats:
    """Calibration statistics of one linear layer with weight W [N, K], as plain tensors.

    H: [K, K] fp32 input Hessian X^T X. act_max: [K] per-input-channel max |x|.
    fisher: [N, K] diagonal empirical Fisher (mean squared gradient of each weight).
    """

    H: torch.Tensor | None = None
    act_max: torch.Tensor | None = None
    fisher: torch.Tensor | None = None


@dataclass(frozen=True)
class DecomposeOptions:
    """How a decomposition runs.

    rounding: "nearest" (round to nearest) or a GPTQ variant (`ROUNDINGS`; GPTQ error feedback, needs H)
        for the final Q step (LQ-LoRA's alternating steps and SVDQuant's alpha search round to nearest).
        With GPTQ the
        low-rank part of LoRC, LQ-LoRA and SVDQuant is then refit to the output error (`gptq_lowrank`).
    iterations: cap on LQ-LoRA's alternating steps. tol: LQ-LoRA stops when an iterate improves the
    error by less than this fraction. alpha: SVDQuant migration strength; None searches ALPHAS when H
    is given and uses 0.5 otherwise.
    """

    rounding: str = "nearest"
    iterations: int = 20
    tol: float = 1e-3
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise DecomposeError(f"unknown rounding {self.rounding!r}; choose one of {', '.join(ROUNDINGS)}")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise DecomposeError(f"iterations must be a positive integer, got {self.iterations!r}")
        if not self.tol >= 0:
            raise DecomposeError(f"tol must be >= 0, got {self.tol!r}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise DecomposeError(f"alpha must lie in [0, 1], got {self.alpha!r}")


DEFAULT_OPTIONS = DecomposeOptions()


@dataclass
class Decomposition:
    """W [N, K] ~ (dequantize(q) + l1 @ l2) / smooth[None, :].

    q: the quantized part. l1: [N, r] and l2: [r, K] float32, None when r = 0. smooth: [K] float32
    SVDQuant smoothing factors (inputs are divided by them), None without smoothing.
    info: method, rank, errors of W_hat against W (frobenius_error, and output_error / fisher_error
    when H / the Fisher were given) and method-specific entries (iterations, alpha).
    """

    q: QTensor
    l1: torch.Tensor | None
    l2: torch.Tensor | None
    smooth: torch.Tensor | None
    info: dict = field(default_factory=dict)

    def weight(self) -> torch.Tensor:
        """The effective weight W_hat [N, K] float32 in the layer's original input space."""
        return reconstruct(dequantize(self.q), self.l1, self.l2, self.smooth)


def reconstruct(
    Qd: torch.Tensor, L1: torch.Tensor | None, L2: torch.Tensor | None, smooth: torch.Tensor | None = None
) -> torch.Tensor:
    """(Qd + L1 @ L2) / smooth[None, :] for a dequantized Qd [N, K]."""
    W_hat = Qd if L1 is None or L1.shape[1] == 0 else Qd + L1 @ L2
    return W_hat if smooth is None else W_hat / smooth[None, :]


def uses_gptq(rounding: str) -> bool:
    """Whether `rounding` (a ROUNDINGS name) is a GPTQ variant, which reads the input Hessian."""
    return ROUNDINGS[rounding] is not None


def quantize_step(W: torch.Tensor, spec: QuantSpec, rounding: str, H: torch.Tensor | None) -> QTensor:
    """The Q step of every method: round-to-nearest, or GPTQ against the Hessian H [K, K] of the inputs."""
    if uses_gptq(rounding):
        if H is None:
            raise DecomposeError(f"rounding={rounding!r} needs the input Hessian H")
        return gptq(W, H, spec, **ROUNDINGS[rounding])
    return quantize(W, spec)


def gptq_lowrank(
    W: torch.Tensor,
    spec: QuantSpec,
    rank: int,
    H: torch.Tensor | None,
    L1: torch.Tensor,
    L2: torch.Tensor,
    rounds: int,
    rounding: str = "gptq",
) -> tuple[QTensor, torch.Tensor, torch.Tensor]:
    """Output-aware Q + L1 L2 of W [N, K] from a start L1 [N, r], L2 [r, K], alternating as CALDERA does
    (Saha et al. 2024, Alg. 1, with GPTQ for its LDLQ step): `rounds` times Q <- GPTQ(W - L1 L2) then
    L1 L2 <- argmin tr((W - Q - L1 L2) H (W - Q - L1 L2)^T) (`hessian_svd_r`), keeping the best round by
    output error. Each L step is optimal for its Q, so the result is never worse than GPTQ(W - L_start)
    with the starting factors."""
    if H is None:
        raise DecomposeError(f"rounding={rounding!r} needs the input Hessian H")
    best = None
    for _ in range(rounds):
        q = quantize_step(W - L1 @ L2, spec, rounding, H)
        Qd = dequantize(q)
        L1, L2 = hessian_svd_r(W - Qd, rank, H)
        err = output_error(W, Qd + L1 @ L2, H)
        if best is None or err < best[0]:
            best = (err, q, L1, L2)
    return best[1], best[2], best[3]


def final_q(
    W: torch.Tensor,
    spec: QuantSpec,
    L1: torch.Tensor,
    L2: torch.Tensor,
    H: torch.Tensor | None,
    rounding: str,
    rounds: int = 1,
) -> tuple[QTensor, torch.Tensor, torch.Tensor]:
    """The final Q of W [N, K] for the low-rank part L1 [N, r] L2 [r, K]: Q = W - L1 L2 rounded to nearest or
    by GPTQ; with GPTQ and r > 0, `rounds` rounds of GPTQ and the output-optimal refit of L1 L2
    (`gptq_lowrank`) instead (rounds=0: L1 L2 kept). Returns (Q, L1, L2)."""
    if uses_gptq(rounding) and rounds and L1.shape[1]:
        return gptq_lowrank(W, spec, L1.shape[1], H, L1, L2, rounds, rounding)
    return quantize_step(W - L1 @ L2, spec, rounding, H), L1, L2


def finish(
    W: torch.Tensor,
    q: QTensor,
    L1: torch.Tensor | None,
    L2: torch.Tensor | None,
    stats: Stats,
    smooth: torch.Tensor | None = None,
    **info,
) -> Decomposition:
    """Bundle a decomposition of W [N, K]; empty factors (r = 0) become None; errors go into info."""
    if L1 is not None and L1.shape[1] == 0:
        L1 = L2 = None
    d = Decomposition(q, L1, L2, smooth, {"rank": 0 if L1 is None else int(L1.shape[1]), **info})
    D = W.float() - d.weight()  # [N, K]; the reconstruction is freed before the errors' temporaries exist
    d.info.update(delta_errors(D, stats.H, stats.fisher))
    return d


def _check_stat(t: torch.Tensor | None, shape: tuple[int, ...], name: str) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise DecomposeError(f"{name} must have shape {list(shape)}, got {got}")
    if not bool(torch.isfinite(t).all()):
        raise DecomposeError(f"{name} contains NaN/Inf")


def check_inputs(W: torch.Tensor, spec: QuantSpec, rank: int, stats: Stats) -> None:
    """Validate a decomposition's inputs: W a finite float matrix [N, K] of any float dtype, and its
    statistics of matching shapes."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.numel() == 0 or not W.is_floating_point():
        raise DecomposeError(
            f"W must be a non-empty float matrix [N, K], got {getattr(W, 'shape', type(W).__name__)}"
        )
    if not bool(torch.isfinite(W).all()):
        raise DecomposeError("W contains NaN/Inf")
    if not isinstance(spec, QuantSpec):
        raise DecomposeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    N, K = W.shape
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= min(N, K):
        raise DecomposeError(
            f"rank must be an integer in [0, {min(N, K)}] for W of shape {(N, K)}, got {rank!r}"
        )
    _check_stat(stats.H, (K, K), "H")
    _check_stat(stats.act_max, (K,), "act_max")
    _check_stat(stats.fisher, (N, K), "fisher")


def quantized(
    W: torch.Tensor, spec: QuantSpec, stats: Stats, opts: DecomposeOptions, method: str
) -> Decomposition:
    """W ~ Q alone by the Q step of `opts.rounding`: what every method but SVDQuant computes at rank 0.

    W [N, K] may be in any float dtype: the Q step and the errors each convert it to float32 themselves, so
    a bfloat16 W is never held as a float32 copy beside GPTQ's working copy and its inverse factor."""
    return finish(W, quantize_step(W, spec, opts.rounding, stats.H), None, None, stats, method=method)


def quantize_only(
    W: torch.Tensor, spec: QuantSpec, rank: int, stats: Stats, opts: DecomposeOptions
) -> Decomposition:
    """W ~ Q, no low-rank part (method "none"): rank must be 0."""
    if rank:
        raise DecomposeError(f"method 'none' has no low-rank part, but rank={rank} was asked")
    return quantized(W, spec, stats, opts, "none")
