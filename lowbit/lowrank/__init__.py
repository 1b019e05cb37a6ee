"""Low-bit plus low-rank decompositions W ~ Q + L1 L2, with optional SVDQuant smoothing.

    d = decompose(W, QuantSpec("nf3", 64), 16, "lqlora")
    W_hat = d.weight()                       # (dequantize(d.q) + d.l1 @ d.l2) / d.smooth
    d.info["frobenius_error"], d.info["output_error"]   # the latter when H is given

Methods (METHODS): "none" (Q only), "lorc" (ZeroQuant-V2), "lqlora" and "lqlora-fisher" (LQ-LoRA),
"svdquant" (SVDQuant; `shared_smoothing` picks one smoothing vector for layers that read one input).
Every Q step rounds to nearest or, with rounding="gptq" (or another GPTQ variant of ROUNDINGS), by GPTQ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.lowrank.decomposition import (
    ROUNDINGS,
    DecomposeError,
    DecomposeOptions,
    Decomposition,
    Stats,
    check_inputs,
    quantize_only,
    quantized,
    reconstruct,
    uses_gptq,
)
from lowbit.lowrank.error import errors, fisher_error, frobenius_error, output_error
from lowbit.lowrank.lorc import lorc
from lowbit.lowrank.lqlora import lqlora, lqlora_fisher
from lowbit.lowrank.svd import LowRankError, fisher_weights, randomized_svd, svd_r, weighted_svd_r
from lowbit.lowrank.svdquant import shared_smoothing, smoothing_factors, svdquant
from lowbit.quantizers import QuantSpec


@dataclass(frozen=True)
class Method:
    """One decomposition method, described once for every stage that runs it.

    fn(W, spec, rank, stats, options) -> Decomposition, for inputs `decompose` has checked (W float32).
    needs: the calibration statistics it reads beyond what its rounding needs ("act": per-channel input
        magnitudes, "hessian": X^T X, "fisher": the diagonal Fisher of the loss).
    shares_smoothing: its smoothing vector is shared by the layers reading one norm and folded into it.
    at_rank_zero: it still differs from plain quantization at rank 0 (SVDQuant's smoothing); the others
        are not called at rank 0, `decompose` answers with the Q step alone.
    """

    fn: Callable[..., Decomposition]
    needs: tuple[str, ...] = ()
    shares_smoothing: bool = False
    at_rank_zero: bool = False


METHODS: dict[str, Method] = {
    "none": Method(quantize_only),
    "lorc": Method(lorc),
    "lqlora": Method(lqlora),
    "lqlora-fisher": Method(lqlora_fisher, needs=("fisher",)),
    "svdquant": Method(svdquant, needs=("act", "hessian"), shares_smoothing=True, at_rank_zero=True),
}


def decompose(
    W: torch.Tensor,
    spec: QuantSpec,
    rank: int,
    method: str,
    *,
    H: torch.Tensor | None = None,
    act_max: torch.Tensor | None = None,
    fisher: torch.Tensor | None = None,
    rounding: str = "nearest",
    iterations: int = 20,
    alpha: float | None = None,
) -> Decomposition:
    """Decompose W [N, K] into a quantized part in `spec` plus a rank-`rank` part by `method`.

    H: [K, K] input Hessian X^T X (GPTQ rounding, SVDQuant's alpha search, output_error);
    act_max: [K] per-input-channel max |x| (SVDQuant); fisher: [N, K] diagonal Fisher (lqlora-fisher).
    rounding: "nearest" or a GPTQ variant ("gptq", ...: ROUNDINGS); iterations: LQ-LoRA's cap; alpha:
    SVDQuant's migration strength (None: searched when H is given, else 0.5).
    """
    if method not in METHODS:
        raise DecomposeError(f"unknown decompose method {method!r}; choose one of {', '.join(METHODS)}")
    opts = DecomposeOptions(rounding=rounding, iterations=iterations, alpha=alpha)
    stats = Stats(H=H, act_max=act_max, fisher=fisher)
    check_inputs(W, spec, rank, stats)
    if rank == 0 and not METHODS[method].at_rank_zero:
        return quantized(W.detach(), spec, stats, opts, method)  # in W's dtype: no float32 copy held
    return METHODS[method].fn(W.detach().float(), spec, rank, stats, opts)


__all__ = [
    "METHODS",
    "Method",
    "ROUNDINGS",
    "uses_gptq",
    "DecomposeError",
    "DecomposeOptions",
    "Decomposition",
    "LowRankError",
    "Stats",
    "decompose",
    "errors",
    "fisher_error",
    "fisher_weights",
    "frobenius_error",
    "lorc",
    "lqlora",
    "lqlora_fisher",
    "output_error",
    "quantize_only",
    "randomized_svd",
    "reconstruct",
    "shared_smoothing",
    "smoothing_factors",
    "svd_r",
    "svdquant",
    "weighted_svd_r",
]
