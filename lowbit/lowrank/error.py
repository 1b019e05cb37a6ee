"""Reconstruction errors of a weight approximation W_hat ~ W [N, K].

Three objectives, all sums of squares (so they add over layers and the allocator can compare them):

- frobenius_error: ||W - W_hat||_F^2, the objective of LoRC and LQ-LoRA (Guo et al. 2023, eq. 1).
- output_error: E||x W^T - x W_hat^T||^2 summed over the calibration inputs x, which equals
  tr((W - W_hat) H (W - W_hat)^T) with H = X^T X the input Hessian (GPTQ, Frantar et al. 2022, eq. 1).
- fisher_error: sum(F * (W - W_hat)^2) with F the diagonal empirical Fisher (LQ-LoRA sec. 3.3).
"""

from __future__ import annotations

import torch


class ErrorShapeError(ValueError):
    """Two tensors that should describe the same weight matrix have incompatible shapes."""


def _delta(W: torch.Tensor, W_hat: torch.Tensor) -> torch.Tensor:
    if W.shape != W_hat.shape or W.dim() != 2:
        raise ErrorShapeError(
            f"W and W_hat must be matrices of one shape, got {tuple(W.shape)} and {tuple(W_hat.shape)}"
        )
    return W.float() - W_hat.float()


def frobenius_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """||W - W_hat||_F^2."""
    return float(_delta(W, W_hat).square().sum())


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H D^T) with D = W - W_hat [N, K] and H [K, K] the input Hessian X^T X."""
    return _output(_delta(W, W_hat), H)


def _output(D: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H D^T) of D [N, K]: (D H) * D summed, the product taken in place (one [N, K] besides D)."""
    if H.shape != (D.shape[1], D.shape[1]):
        raise ErrorShapeError(
            f"H must be [{D.shape[1]}, {D.shape[1]}] for W [N, {D.shape[1]}], got {tuple(H.shape)}"
        )
    return float((D @ H.float()).mul_(D).sum())


def fisher_error(W: torch.Tensor, W_hat: torch.Tensor, F: torch.Tensor) -> float:
    """sum(F * (W - W_hat)^2) with F [N, K] the diagonal Fisher."""
    return _fisher(_delta(W, W_hat), F)


def _fisher(D: torch.Tensor, F: torch.Tensor) -> float:
    if F.shape != D.shape:
        raise ErrorShapeError(f"fisher must have W's shape {tuple(D.shape)}, got {tuple(F.shape)}")
    return float((F.float() * D.square()).sum())


def errors(
    W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None = None, F: torch.Tensor | None = None
) -> dict[str, float]:
    """Every error the statistics allow: frobenius_error always, output_error with H, fisher_error with F."""
    return delta_errors(_delta(W, W_hat), H, F)


def delta_errors(
    D: torch.Tensor, H: torch.Tensor | None = None, F: torch.Tensor | None = None
) -> dict[str, float]:
    """`errors` of the difference D = W - W_hat [N, K] (fp32), bit for bit: a caller that forms D itself
    need not hold W_hat meanwhile (for Llama-3-8B's gate_proj, each fp32 [N, K] is 0.23 GB)."""
    out = {"frobenius_error": float(D.square().sum())}
    if H is not None:
        out["output_error"] = _output(D, H)
    if F is not None:
        out["fisher_error"] = _fisher(D, F)
    return out
