"""SVDQuant (Li et al. 2024, "SVDQuant: Absorbing Outliers by Low-Rank Components", sec. 4).

Smoothing migrates activation outliers into the weights (SmoothQuant, Xiao et al. 2023, eq. 4):

    lambda_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha),   W' = W diag(lambda),   x' = x / lambda,

then a high-precision low-rank branch absorbs the now larger weight outliers and only the residual is
quantized (eq. 5):

    L1 L2 = SVD_r(W'),   Q = quantize(W' - L1 L2).

lambda is normalised to geometric mean 1 (x W^T = x' W'^T holds for any scaling). alpha is chosen on a
grid by the output error E||x W^T - x' (Q + L1 L2)^T||^2 = tr(D H D^T), D = W - (Q + L1 L2) diag(1/lambda),
over ALPHAS and "no smoothing"; the search rounds to nearest and the chosen alpha is then quantized with
the requested rounding. GPTQ rounding sees the Hessian of x', diag(1/lambda) H diag(1/lambda), and is
followed by an output-optimal refit of L1 L2 to W' - Q (`final_q`: `gptq_lowrank`, one round).

Layers that read one input (q/k/v after one norm, gate/up after another) can share one lambda, which then
folds into that norm's weight (x / lambda = (norm.weight / lambda) * normalized x): `shared_smoothing`
takes eq. 4's max over all the group's rows and searches alpha by the group's summed output error.
"""

from __future__ import annotations

import torch

from lowbit.lowrank.decomposition import (
    DEFAULT_OPTIONS,
    DecomposeError,
    DecomposeOptions,
    Decomposition,
    Stats,
    check_inputs,
    final_q,
    finish,
)
from lowbit.lowrank.svd import svd_r
from lowbit.quantizers import QuantSpec

ALPHAS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)
DEFAULT_ALPHA = 0.5


def _floored(x: torch.Tensor) -> torch.Tensor:
    """|x| with zeros raised to a tiny fraction of the largest entry, so powers and logs stay finite."""
    x = x.float().abs()
    return x.clamp_min(max(float(x.max()) * 1e-5, 1e-12))


def smoothing_factors(act_max: torch.Tensor, W: torch.Tensor, alpha: float) -> torch.Tensor:
    """lambda [K] = act_max^alpha / max_n |W[n, :]|^(1 - alpha), normalised to geometric mean 1."""
    lam = _floored(act_max) ** alpha / _floored(W.abs().amax(0)) ** (1.0 - alpha)  # [K]
    return lam / lam.log().mean().exp()


def act_magnitude(stats: Stats) -> torch.Tensor:
    """Per-input-channel activation magnitude [K]: act_max, else sqrt(diag(H)) (an RMS up to a constant)."""
    if stats.act_max is not None:
        return stats.act_max.float().abs()
    if stats.H is not None:
        return torch.diag(stats.H.float()).clamp_min(0).sqrt()
    raise DecomposeError("method 'svdquant' needs act_max or the Hessian H to set its smoothing factors")


def svdquant_smoothed(
    W: torch.Tensor, spec: QuantSpec, rank: int, smooth: torch.Tensor | None, stats: Stats, rounding: str
) -> Decomposition:
    """SVDQuant with given smoothing factors smooth [K] (None: no smoothing) for W [N, K]."""
    Ws, Hs = W, stats.H
    if smooth is not None:
        Ws = W * smooth[None, :]  # W' [N, K]
        if Hs is not None:
            Hs = Hs.float() / smooth[:, None] / smooth[None, :]  # Hessian of x' = x / lambda
    L1, L2 = svd_r(Ws, rank)  # [N, r], [r, K]
    q, L1, L2 = final_q(Ws, spec, L1, L2, Hs, rounding)
    return finish(W, q, L1, L2, stats, smooth, method="svdquant")


def svdquant(
    W: torch.Tensor, spec: QuantSpec, rank: int, stats: Stats, opts: DecomposeOptions
) -> Decomposition:
    """Smoothing + low-rank branch + residual quantization of W [N, K]; alpha searched when H is given."""
    amax = act_magnitude(stats)
    if opts.alpha is not None or stats.H is None:
        alpha = DEFAULT_ALPHA if opts.alpha is None else opts.alpha
        d = svdquant_smoothed(W, spec, rank, smoothing_factors(amax, W, alpha), stats, opts.rounding)
        d.info["alpha"] = alpha
        return d
    best, best_alpha = None, None
    for alpha in (None, *ALPHAS):
        smooth = None if alpha is None else smoothing_factors(amax, W, alpha)
        d = svdquant_smoothed(W, spec, rank, smooth, stats, "nearest")
        if best is None or d.info["output_error"] < best.info["output_error"]:
            best, best_alpha = d, alpha
    if opts.rounding != "nearest":
        best = svdquant_smoothed(W, spec, rank, best.smooth, stats, opts.rounding)
    best.info["alpha"] = best_alpha
    return best


def shared_smoothing(
    Ws: list[torch.Tensor],
    specs: list[QuantSpec],
    ranks: list[int],
    stats: Stats,
    opts: DecomposeOptions = DEFAULT_OPTIONS,
) -> tuple[torch.Tensor | None, float | None]:
    """One smoothing vector for weights W_i [N_i, K] that read the same input x; returns (lambda [K], alpha).

    lambda_j = max|x_j|^alpha / max_i,n |W_i[n, j]|^(1 - alpha) (eq. 4 over the stacked [sum N_i, K] rows).
    With H, alpha is searched as in `svdquant` by the summed output error sum_i tr(D_i H D_i^T) (one H: the
    members share x), each W_i decomposed with its own spec and rank, rounding to nearest; (None, None)
    when no smoothing wins. stats: the shared input's H [K, K] and act_max [K].
    """
    if not Ws or not len(Ws) == len(specs) == len(ranks):
        raise DecomposeError(
            f"need one spec and one rank per weight, got {len(Ws)}, {len(specs)}, {len(ranks)}"
        )
    stats = Stats(H=stats.H, act_max=stats.act_max)
    for W, spec, r in zip(Ws, specs, ranks, strict=True):
        check_inputs(W, spec, r, stats)
    Ws = [W.detach().float() for W in Ws]
    amax, W_all = act_magnitude(stats), torch.cat(Ws)  # [K], [sum N_i, K]
    if opts.alpha is not None or stats.H is None:
        alpha = DEFAULT_ALPHA if opts.alpha is None else opts.alpha
        return smoothing_factors(amax, W_all, alpha), alpha
    best = None
    for alpha in (None, *ALPHAS):
        smooth = None if alpha is None else smoothing_factors(amax, W_all, alpha)
        members = zip(Ws, specs, ranks, strict=True)
        err = sum(
            svdquant_smoothed(W, s, r, smooth, stats, "nearest").info["output_error"] for W, s, r in members
        )
        if best is None or err < best[0]:
            best = (err, smooth, alpha)
    return best[1], best[2]
