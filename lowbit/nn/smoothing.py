"""Smoothing vectors folded into the norm that feeds a layer (SVDQuant, Li et al. 2024, sec. 4; SmoothQuant,
Xiao et al. 2023, eq. 3, folds its smoothing into the preceding LayerNorm the same way).

A layer smoothed by lambda [K] computes (x / lambda) W'^T with W' = W diag(lambda). When x is exactly the
output of a norm, x / lambda = (norm.weight / lambda) * normalized(x) (+ norm.bias / lambda for a
LayerNorm), so lambda folds into the norm and the layer stores no smoothing vector; every other linear
reading that norm then sees x / lambda too, and a dense reader takes W diag(lambda).

`norm_readers` finds which linears read which norm (one forward pass with hooks); `fold_into_norm` folds
one lambda, checked against the norm's output. The compress pipeline and the exports both use them.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.nn.qlinear import QLinear


def _keep(store: dict, name: str, value) -> None:
    """Record a hook's first value; returns None so that the hook changes nothing."""
    store.setdefault(name, value)


@torch.no_grad()
def norm_readers(model: nn.Module, ids: torch.Tensor) -> dict[str, tuple[list[str], torch.Tensor]]:
    """{norm name: (linear layers whose input is exactly that norm's output, the norm's input)} for the
    leaf modules with a 1-D weight (RMSNorm, LayerNorm), found by running the model once on ids [B, L]."""
    norms, inputs, hooks = {}, {}, []  # norms: name -> (input, output); tensors kept alive, so ids are unique
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, QLinear)):
            hooks.append(m.register_forward_pre_hook(lambda _, a, n=name: _keep(inputs, n, a[0])))
        elif not list(m.children()) and getattr(getattr(m, "weight", None), "ndim", 0) == 1:
            hooks.append(m.register_forward_hook(lambda _, a, out, n=name: _keep(norms, n, (a[0], out))))
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    by_id = {id(out): n for n, (_, out) in norms.items()}
    readers: dict[str, tuple[list[str], torch.Tensor]] = {}
    for lin, x in inputs.items():
        if id(x) in by_id:
            norm = by_id[id(x)]
            readers.setdefault(norm, ([], norms[norm][0]))[0].append(lin)
    return readers


@torch.no_grad()
def fold_into_norm(norm: nn.Module, x: torch.Tensor, lam: torch.Tensor, dense: list[nn.Linear]) -> bool:
    """Divide the norm's weight (and bias) by lam [K] and give each dense reader W diag(lam), in place.

    Returns False and changes nothing when the folded norm's output on its input x [..., K] is not the
    old output / lam (a norm that is not linear in its weight, such as Gemma's x * (1 + weight)).
    """
    before = norm(x)
    saved = {k: v.clone() for k, v in norm.state_dict().items()}
    norm.weight.data = norm.weight.data / lam.to(norm.weight.device, norm.weight.dtype)
    if getattr(norm, "bias", None) is not None:
        norm.bias.data = norm.bias.data / lam.to(norm.bias.device, norm.bias.dtype)
    expected = before / lam.to(before.device, before.dtype)
    rtol = max(1e-4, 8 * torch.finfo(before.dtype).eps)  # a few roundings of the norm's dtype
    if not torch.allclose(norm(x), expected, rtol=rtol, atol=rtol * 1e-2 * float(expected.abs().max())):
        norm.load_state_dict(saved)
        return False
    for m in dense:
        m.weight.data = m.weight.data * lam.to(m.weight.device, m.weight.dtype)
    return True
