"""SVDQuant smoothing folded into the norm that feeds a layer (Li et al. 2024, sec. 4; SmoothQuant, Xiao
et al. 2023, folds its smoothing into the preceding LayerNorm the same way).

A layer smoothed by lambda [K] computes (x / lambda) W'^T with W' = W diag(lambda). When x is exactly the
output of a norm, x / lambda = (norm.weight / lambda) * normalized(x) (+ norm.bias / lambda for a
LayerNorm), so lambda folds into the norm and the layer stores no smoothing vector. Every other linear
reading that norm then sees x / lambda too: the readers share one lambda
(`lowbit.lowrank.svdquant.shared_smoothing`) and a dense reader takes W diag(lambda).

`norm_readers` finds which linears read which norm (one forward pass with hooks); `norm_groups` picks the
norms whose readers may share a lambda; `fold_into_norm` / `fold_group` fold one, checked;
`compress_norm_groups` is the uniform pipeline's SVDQuant step for one decoder block (the budget path
does the same with each layer's allocated spec and rank, `lowbit.compress.budget.smoothing_stage`);
`qlinear_of` turns a decomposition into the QLinear that holds it. The export
(`lowbit.compress.prepare`) folds a checkpoint's shared smoothing with the same helpers.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.compress.qlinear import QLinear, set_submodule
from lowbit.compress.recipe import Recipe
from lowbit.lowrank import Decomposition, Stats
from lowbit.lowrank.svdquant import shared_smoothing, svdquant_smoothed
from lowbit.quantizers import SCALE_DTYPES


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


def qlinear_of(linear: nn.Linear, d: Decomposition, recipe: Recipe, keep_smooth: bool = True) -> QLinear:
    """The QLinear holding decomposition d of `linear`: low-rank factors in the recipe's lowrank_dtype,
    the smoothing vector (when kept) in the weight's dtype."""
    lowrank = SCALE_DTYPES[recipe.decompose.lowrank_dtype]
    smooth = d.smooth if keep_smooth else None
    return QLinear.from_linear(
        linear,
        d.q,
        None if d.l1 is None else d.l1.to(lowrank),
        None if d.l2 is None else d.l2.to(lowrank),
        None if smooth is None else smooth.to(linear.weight.dtype),
    )


def norm_groups(model: nn.Module, readers: dict, layers) -> dict[str, list[str]]:
    """{norm: its readers among `layers`} for each norm read by one of `layers` whose other readers are
    all dense nn.Linear (those take W diag(lambda) when lambda is folded into the norm)."""
    groups = {}
    for norm, (names, _) in readers.items():
        members = [n for n in names if n in layers]
        others = [model.get_submodule(n) for n in names if n not in members]
        if members and all(isinstance(m, nn.Linear) for m in others):
            groups[norm] = members
    return groups


def fold_group(
    model: nn.Module,
    norm: str,
    readers: dict,
    members: list[str],
    lam: torch.Tensor,
    teacher: nn.Module | None = None,
) -> bool:
    """Fold lam into `norm`, its readers outside `members` taking W diag(lam); False when it cannot fold.

    The teacher (the original model kept for fine-tuning) gets the same fold with every reader dense, so
    it computes what it did, with weights W diag(lambda) in the domain of the quantized layers.
    """
    names, x = readers[norm]
    dense = [model.get_submodule(n) for n in names if n not in members]
    folded = fold_into_norm(model.get_submodule(norm), x, lam, dense)
    if folded and teacher is not None:
        fold_into_norm(teacher.get_submodule(norm), x, lam, [teacher.get_submodule(n) for n in names])
    return folded


def compress_norm_groups(
    model: nn.Module,
    readers: dict[str, tuple[list[str], torch.Tensor]],
    linears: dict[str, nn.Linear],
    block_stats: dict,
    recipe: Recipe,
    teacher: nn.Module | None = None,
) -> set[str]:
    """SVDQuant, with one lambda per norm folded into it, of the linears of one decoder block that read a
    norm's output; returns the names compressed (the caller compresses the block's other layers alone).

    readers: from `norm_readers`; linears: the layers the recipe quantizes; block_stats: {name: LayerStats}
    of the block. A norm's dense readers that the recipe leaves out take W diag(lambda). A norm read by a
    layer that is neither (a QLinear already) is skipped.
    """
    done = set()
    rank = recipe.decompose.rank
    for norm, members in norm_groups(model, readers, [n for n in linears if n in block_stats]).items():
        st = block_stats[members[0]]  # the members read one input: their statistics agree
        stats = Stats(H=st.hessian_matrix(), act_max=st.act_max)
        cfgs = [recipe.layer_config(n) for n in members]
        Ws = [linears[n].weight.detach().float() for n in members]  # W_i [N_i, K], as calibrated
        lam, _ = shared_smoothing(Ws, [c.spec() for c in cfgs], [rank] * len(Ws), stats)
        folded = lam is not None and fold_group(model, norm, readers, members, lam, teacher)
        for name, W, cfg in zip(members, Ws, cfgs, strict=True):
            d = svdquant_smoothed(W, cfg.spec(), rank, lam, stats, cfg.rounding)
            set_submodule(model, name, qlinear_of(linears[name], d, recipe, keep_smooth=not folded))
        done.update(members)
    return done
