"""Fitting a loaded lowbit model to what an export target holds (compressed-tensors, GGUF), in place.

Each quantized layer computes y = (x / smooth) (dequantize(Q) + L1 L2)^T. An export format holds Q only
in some specs and has no smoothing: `prepare` folds each shared SVDQuant smoothing vector into the norm
that feeds its layers (the norm's weight divided by `smooth`), then either refuses the layers the format
cannot hold, with one line listing them, or re-quantizes them (round to nearest) to the nearest spec it
can: Q' = quantize(dequantize(Q) / smooth), L2' = L2 / smooth. It reports, per layer, the relative error
||W' - W||_F / ||W||_F of the weight the format's reader computes against the checkpoint's.

A layer with an online Hadamard transform (x -> x R before the weight, `lowbit.compress.rotation`) has
no form in these formats: `fit_to_target` refuses it, converting or not; the dense export folds it back
exactly (`effective_weight`: the weight seen from x is W R^T).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.export.target import ExportError, Target
from lowbit.nn.qlinear import QLinear, set_submodule
from lowbit.nn.smoothing import fold_into_norm, norm_readers
from lowbit.quantizers import QuantSpec, dequantize, quantize
from lowbit.quantizers.hadamard import online_matrix


def probe_ids(model: nn.Module) -> torch.Tensor:
    """32 fixed random token ids [2, 16]: the input every export checks its logits on."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (2, 16), generator=g)


@torch.no_grad()
def _fold_smoothing(model: nn.Module, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Fold each shared smoothing vector into the norm feeding its layers, in place.

    Returns ({folded layer: its former smooth [K]}, {smoothed layer left smoothed: why}). A norm is
    folded only when every linear reading it is a QLinear with that same smooth or a dense Linear (which
    absorbs diag(smooth) into its weight) and the folded norm's output checks out as old output / smooth.
    """
    folded, why = {}, {}
    for norm_name, (readers, x) in norm_readers(model, ids).items():
        layers = {n: model.get_submodule(n) for n in readers}
        smoothed = [n for n, m in layers.items() if isinstance(m, QLinear) and m.smooth is not None]
        if not smoothed:
            continue
        smooth = layers[smoothed[0]].smooth
        plain = [n for n, m in layers.items() if isinstance(m, QLinear) and m.smooth is None]
        if plain or any(not torch.equal(layers[n].smooth, smooth) for n in smoothed):
            reason = f"the layers reading {norm_name} do not share one smoothing vector"
            why.update({n: reason for n in smoothed})
            continue
        dense = [m for m in layers.values() if isinstance(m, nn.Linear)]
        if not fold_into_norm(model.get_submodule(norm_name), x, smooth, dense):
            why.update({n: f"{norm_name} does not scale linearly with its weight" for n in smoothed})
            continue
        for n in smoothed:
            layers[n].smooth = None
            folded[n] = smooth
    return folded, why


def effective_weight(m: QLinear) -> torch.Tensor:
    """What the layer multiplies its input by: (dequantize(Q) + L1 L2) / smooth, float32 [N, K], times
    R^T for a layer that first rotates its input (y = (x R) W^T = x (W R^T)^T)."""
    W = dequantize(m.qtensor())
    if m.l1 is not None:
        W = W + m.l1.float() @ m.l2.float()
    W = W if m.smooth is None else W / m.smooth.float()
    if m.hadamard:
        W = (W.double() @ online_matrix(m.in_features).to(W.device).T).float()
    return W


@torch.no_grad()
def _requantize(m: QLinear, spec: QuantSpec) -> QLinear:
    """A QLinear of `spec` without smoothing that computes what `m` does, its base re-quantized (RTN):
    Q' = quantize(dequantize(Q) / smooth), L2' = L2 / smooth, L1 and bias kept."""
    N, K = m.out_features, m.in_features
    inv = torch.ones(K, device=m.codes.device) if m.smooth is None else 1 / m.smooth.float()  # [K]
    dtype = next((t.dtype for t in (m.l1, m.bias, m.smooth) if t is not None), torch.float32)
    out = QLinear(K, N, spec, m.rank, m.bias is not None, False, dtype, m.codes.device, m.backend)
    l2 = None if m.l2 is None else (m.l2.float() * inv).to(m.l2.dtype)
    out.replace_weight(quantize(dequantize(m.qtensor()) * inv, spec), m.l1, l2)
    if m.bias is not None:
        out.bias.data.copy_(m.bias)
    return out


def _refuse(target: Target, problems: dict[str, str]) -> None:
    listed = "; ".join(f"{n}: {p}" for n, p in list(problems.items())[:20])
    listed += f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ExportError(
        f"{len(problems)} layer(s) cannot be exported to {target.name} as they are "
        f"(pass --convert to re-quantize them): {listed}"
    )


@torch.no_grad()
def fit_to_target(model: nn.Module, target: Target, convert: bool, dtype: torch.dtype) -> dict[str, dict]:
    """Fold smoothing and re-quantize what `target` cannot hold (or refuse), in place.

    Returns the per-layer report: source and target spec, rank, what happened to the smoothing, why the
    layer was converted, and rel_error = ||W' - W|| / ||W|| of the weight the target's reader computes
    (base as `target.decoded` in `dtype`, plus L1 L2 in `dtype`, seen from the layer's original input).
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    if rotated := [n for n, m in layers.items() if m.hadamard]:
        more = f" and {len(rotated) - 1} more" if len(rotated) > 1 else ""
        raise ExportError(
            f"{target.name} cannot express the online Hadamard transform of layer {rotated[0]}{more}; "
            "export it as dense"
        )
    reference = {n: effective_weight(m) for n, m in layers.items()}
    folded, smooth_why = _fold_smoothing(model, probe_ids(model))
    for n, m in layers.items():
        if m.smooth is not None and n not in smooth_why:
            smooth_why[n] = "its input does not come straight from a norm, so its smoothing cannot be folded"
    problems = {n: target.problem(m.spec, m.in_features) or smooth_why.get(n) for n, m in layers.items()}
    problems = {n: p for n, p in problems.items() if p}
    if problems and not convert:
        _refuse(target, problems)
    report = {}
    for n, m in layers.items():
        entry = {"source": m.spec.short(), "rank": m.rank, "smooth": "folded" if n in folded else None}
        if n in problems:
            m = _requantize(m, target.nearest(m.spec, m.in_features, dtype))
            set_submodule(model, n, m)
            entry.update(converted=problems[n], smooth="re-quantized" if n in smooth_why else entry["smooth"])
        W = target.decoded(m, dtype)
        if m.l1 is not None:
            W = W + m.l1.to(dtype).float() @ m.l2.to(dtype).float()
        if n in folded:
            W = W / folded[n].float()
        err = float((W - reference[n]).norm() / reference[n].norm().clamp_min(1e-30))
        report[n] = {**entry, "target": m.spec.short(), "rel_error": err}
    return report
