"""Activation-aware weight quantization (AWQ; Lin et al. 2024, "AWQ: Activation-aware Weight Quantization
for LLM Compression and Acceleration", sec. 3.2-3.3) as a stage of the block-by-block pipeline.

Scaling (sec. 3.2-3.3). The linears reading one norm's output x [n, K] share a per-input-channel scale
s [K]: each computes (x / s) (W diag(s))^T, the same function, while the quantizer sees W diag(s), whose
salient input channels (those with large activations) now have larger weights and a smaller relative
rounding error (eq. 2-3). The scale is the activation magnitude to a power (eq. 5),

    s = s_x^alpha,   alpha* = argmin_{alpha in {0, 1/grid, ..., (grid-1)/grid}} L(s_x^alpha),
    L(s) = || B(x; Q(W diag(s)) diag(s)^-1) - B(x; W) ||^2                                        (eq. 4)

with s_x the per-channel RMS of x (sqrt of the calibration statistic act_sqmean; the paper's code takes
the mean |x|) and s normalised by sqrt(max s * min s) as in AWQ's code. The loss is measured on the real
block: B is the decoder block's output on its recorded calibration inputs (the first `samples`
sequences), with the group's weights replaced by their round-to-nearest fake quantization and every other
layer as it is; objective "layers" measures instead the group's summed output error sum_i tr(E_i H E_i^T)
against the input Hessian H (no forward pass: AWQ's loss with the layers as the inspected module).
alpha = 0 (s = 1, plain rounding) is on the grid, so the chosen scale never scores worse than
round-to-nearest on those inputs. The chosen s is folded into the norm (norm.weight / s, the
machinery SVDQuant's smoothing uses, `lowbit.compress.smoothing.fold_group`) and the readers keep
W diag(s), so the float model computes what it did; their statistics are rescaled to the new inputs
x / s (H -> diag(1/s) H diag(1/s)), so GPTQ rounding afterwards sees the inputs it will get.

A layer whose input is proportional, channel by channel, to another linear's output (down_proj reading
act(gate) * up, o_proj reading the attention-weighted v: `PREVIOUS`) gets its own scale searched the same
way, folded into that previous linear instead (its output rows / s), as AWQ's code does; the fold is kept
only where the recorded block outputs stay what they were (it is not exact with grouped kv heads).

Clipping (sec. 3.3, AWQ's auto_clip): after scaling, each layer's group ranges are shrunk where that
lowers its output error (`lowbit.quantizers.clip.clip_search`), except q/k projections (AWQ's code skips
them: their output error does not measure the attention scores' error). Clipping rewrites the dense
weight the rounding then quantizes, so it is used without a low-rank part only.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from lowbit.calibration import LayerStats, find_blocks
from lowbit.compress.recipe import Recipe
from lowbit.compress.smoothing import fold_group, norm_groups
from lowbit.parallel import all_reduce, world
from lowbit.quantizers import QuantSpec
from lowbit.quantizers.clip import clip_search, nearest

CLIP_SKIP = ("*.q_proj", "*.k_proj")
# a layer whose input is, channel by channel, proportional to another linear's output (Llama naming):
# down_proj reads act(gate) * up, o_proj reads the attention-weighted v (one to one without grouped heads)
PREVIOUS = {"down_proj": "up_proj", "o_proj": "v_proj"}


def awq_scales(s_x: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] = s_x^alpha / sqrt(max * min) (eq. 5 with AWQ's normalisation); s_x [K] floored at 1e-4."""
    s = s_x.float().clamp_min(1e-4) ** alpha
    return s / (s.max() * s.min()).sqrt()


def act_scale(stats: LayerStats) -> torch.Tensor:
    """s_x [K]: the per-input-channel RMS of a layer's calibration inputs (act_max when absent)."""
    if stats.act_sqmean is not None:
        return stats.act_sqmean.float().sqrt()
    if stats.act_max is not None:
        return stats.act_max.float()
    raise ValueError("AWQ scaling needs the layers' activation statistics ('act')")


def scaled_stats(stats: LayerStats, s: torch.Tensor) -> LayerStats:
    """The statistics of inputs x / s given those of x (s [K] > 0)."""
    s = s.to(torch.float32)
    return LayerStats(
        act_max=None if stats.act_max is None else stats.act_max / s,
        act_sqmean=None if stats.act_sqmean is None else stats.act_sqmean / s.square(),
        hessian=None if stats.hessian is None else stats.hessian / s[:, None] / s[None, :],
        tokens=stats.tokens,
        fisher=stats.fisher,
        fisher_samples=stats.fisher_samples,
    )


class BlockRecorder:
    """A forward hook that keeps (args, kwargs, output) of a block's first calls, up to `samples`
    sequences: the inputs on which AWQ's loss re-runs the block and the float outputs it must reproduce."""

    def __init__(self, samples: int) -> None:
        self.samples = samples
        self.records: list[tuple[tuple, dict, torch.Tensor]] = []
        self.count = 0
        self.handle = None

    def attach(self, block: nn.Module) -> None:
        self.detach()
        self.records, self.count = [], 0
        self.handle = block.register_forward_hook(self._hook, with_kwargs=True)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self.count >= self.samples:
            return
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, L, D]
        out = output[0] if isinstance(output, (tuple, list)) else output
        self.records.append((args, kwargs, out.detach()))
        self.count += hidden.shape[0]


@torch.no_grad()
def block_error(block: nn.Module, records: list) -> float:
    """Mean squared difference between the block's outputs on the recorded inputs and the recorded outputs."""
    total, count = 0.0, 0
    for args, kwargs, ref in records:
        out = block(*args, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        total += float((out.double() - ref.double()).square().sum())
        count += ref.numel()
    return _mean_over_ranks(total, count)


def output_power(records: list) -> float:
    """Mean square of the recorded block outputs."""
    total = sum(float(r.double().square().sum()) for *_, r in records)
    return _mean_over_ranks(total, sum(r.numel() for *_, r in records))


def _mean_over_ranks(total: float, count: int) -> float:
    """total / count summed over the job's processes (each holds its part of the recorded samples), so
    every rank takes the same decisions."""
    t = all_reduce(torch.tensor([total, float(count)], dtype=torch.float64), "sum", world())
    return float(t[0]) / max(float(t[1]), 1.0)


def layers_error(W0: list[torch.Tensor], layers: list[nn.Linear], H: torch.Tensor) -> float:
    """sum_i tr(E_i H E_i^T), E_i = W0_i - W_i: the summed output error of layers reading one input whose
    Hessian is H [K, K] (sum of x x^T over the calibration tokens)."""
    total = 0.0
    for W, m in zip(W0, layers, strict=True):
        E = W.float() - m.weight.data.float()  # [N, K]
        total += float(((E @ H) * E).sum())
    return total


@torch.no_grad()
def search_scales(
    loss: Callable[[], float],
    layers: list[nn.Linear],
    specs: list[QuantSpec],
    s_x: torch.Tensor,
    grid: int = 20,
) -> tuple[float, list[float]]:
    """(alpha*, the loss of every grid point) of eq. 4-5 for `layers`, the readers of one input; each
    candidate replaces their weights by Q(W diag(s)) diag(s)^-1 (round to nearest) and calls loss(). The
    layers' weights are restored."""
    W0 = [m.weight.data for m in layers]
    losses = []
    try:
        for i in range(grid):
            s = awq_scales(s_x, i / grid).to(W0[0].device)
            for m, W, spec in zip(layers, W0, specs, strict=True):
                m.weight.data = (nearest(W.float() * s, spec) / s).to(W.dtype)
            losses.append(loss())
    finally:
        for m, W in zip(layers, W0, strict=True):
            m.weight.data = W
    best = min(range(grid), key=losses.__getitem__)
    return best / grid, losses


class ActivationScaling:
    """AWQ's scale and clip search, one decoder block at a time (module docstring); called by the
    pipeline's per-block callback before the block's layers are rounded.

    readers: `norm_readers` of the model; linears: the layers the recipe quantizes (nn.Linear, in place);
    teacher: the original model kept for fine-tuning, folded alike. `alphas` records each norm's choice.
    """

    def __init__(
        self,
        model: nn.Module,
        readers: dict,
        linears: dict,
        recipe: Recipe,
        teacher=None,
        start: int = 0,
        first: int = 0,
    ) -> None:
        self.model, self.readers, self.linears = model, readers, linears
        self.recipe, self.teacher = recipe, teacher
        self.blocks = find_blocks(model)[1]
        # the "layers" objective needs no recorded outputs but the check of `fold_previous`
        samples = recipe.scaling.samples if recipe.scaling.objective == "block" else 1
        # first: the index of this process's first calibration sample; the job records its first samples
        self.recorder = BlockRecorder(max(0, samples - first))
        self.recorder.attach(self.blocks[start])  # the first block this run calibrates
        self.alphas: dict[str, float] = {}
        # the folded scales s [K], "norm:<norm>" or "previous:<layer>", for `apply_scales` to replay
        self.scales: dict[str, torch.Tensor] = {}

    def __call__(self, index: int, block: nn.Module, block_stats: dict) -> None:
        """Scale, fold and clip the block's layers in place; rescale their entries of block_stats."""
        records = self.recorder.records
        self.recorder.detach()
        if index + 1 < len(self.blocks):
            self.recorder.attach(self.blocks[index + 1])  # records block index+1 during its statistics run
        cfg = self.recipe.scaling
        layers = [n for n in self.linears if n in block_stats]
        for norm, members in norm_groups(self.model, self.readers, layers).items():
            specs = [self.recipe.layer_config(n).spec() for n in members]
            s_x = act_scale(block_stats[members[0]])  # the members read one input
            mods = [self.linears[n] for n in members]
            loss = self.objective(block, records, mods, block_stats[members[0]])
            alpha, _ = search_scales(loss, mods, specs, s_x, cfg.grid)
            self.alphas[norm] = alpha
            s = awq_scales(s_x, alpha)
            if alpha == 0 or not fold_group(self.model, norm, self.readers, members, s, self.teacher):
                continue
            self.scales[f"norm:{norm}"] = s
            for name, m in zip(members, mods, strict=True):
                _scale(m, s, 1)
                block_stats[name] = scaled_stats(block_stats[name], s)
        for name in layers:
            self.fold_previous(name, block, records, block_stats)
        if cfg.clip:
            for name in layers:
                if not any(fnmatch.fnmatchcase(name, p) for p in CLIP_SKIP):
                    self.clip(name, block_stats[name])

    def objective(self, block: nn.Module, records: list, mods: list[nn.Linear], stats: LayerStats):
        """The loss of eq. 4 as a function of the layers' current weights: the block's output error on the
        recorded inputs ("block"), or the layers' summed output error against their input Hessian."""
        if self.recipe.scaling.objective == "block":
            return lambda: block_error(block, records)
        W0 = [m.weight.data for m in mods]
        return lambda: layers_error(W0, mods, stats.hessian)

    def fold_previous(self, name: str, block: nn.Module, records: list, block_stats: dict) -> None:
        """Search the scale of layer `name` and fold it into the linear named by PREVIOUS, when the block's
        recorded outputs show the fold exact; rescales block_stats[name]."""
        head, _, leaf = name.rpartition(".")
        if leaf not in PREVIOUS:
            return
        prev = f"{head}.{PREVIOUS[leaf]}"
        try:
            C, P = self.linears[name], self.model.get_submodule(prev)
        except AttributeError:
            return
        if not isinstance(P, nn.Linear) or P.out_features != C.in_features:
            return
        s_x = act_scale(block_stats[name])
        spec = self.recipe.layer_config(name).spec()
        loss = self.objective(block, records, [C], block_stats[name])
        alpha, _ = search_scales(loss, [C], [spec], s_x, self.recipe.scaling.grid)
        if alpha == 0:
            return
        s = awq_scales(s_x, alpha)
        saved = [(m, {k: v.clone() for k, v in m.state_dict().items()}) for m in (C, P)]
        before = block_error(block, records)  # the rounding the earlier folds left
        _scale(C, s, 1)
        _scale(P, 1 / s, 0)
        ref = output_power(records)
        tol = max(1e-8, (16 * torch.finfo(C.weight.dtype).eps) ** 2) * ref  # a few roundings of the dtype
        if block_error(block, records) > before + tol:  # not a channel-wise proportional input: undo
            for m, sd in saved:
                m.load_state_dict(sd)
            return
        self.alphas[name] = alpha
        self.scales[f"previous:{name}"] = s
        block_stats[name] = scaled_stats(block_stats[name], s)
        if self.teacher is not None:
            _scale(self.teacher.get_submodule(name), s, 1)
            _scale(self.teacher.get_submodule(prev), 1 / s, 0)

    def clip(self, name: str, stats: LayerStats) -> None:
        """AWQ's clipping search on one layer's dense weight, against its input Hessian."""
        cfg, m = self.recipe.scaling, self.linears[name]
        spec = self.recipe.layer_config(name).spec()
        W = clip_search(m.weight.data, stats.hessian, spec, cfg.clip_grid, cfg.clip_max_shrink)
        m.weight.data = W.to(m.weight.dtype)

    def close(self) -> None:
        self.recorder.detach()


@torch.no_grad()
def _scale(m: nn.Linear, s: torch.Tensor, dim: int) -> None:
    """Multiply the weight of `m` by s along dim (1: input columns, W diag(s); 0: output rows, and bias)."""
    s = s.to(m.weight.device)
    m.weight.data = (m.weight.data.float() * (s[None, :] if dim else s[:, None])).to(m.weight.dtype)
    if dim == 0 and m.bias is not None:
        m.bias.data = (m.bias.data.float() * s).to(m.bias.dtype)


@torch.no_grad()
def apply_scales(model: nn.Module, readers: dict, linears: dict, scales: dict[str, torch.Tensor]) -> None:
    """Fold the scales an `ActivationScaling` stage chose (its `scales`) into a fresh copy of the model it
    ran on: the same folds, in the same order, without the search."""
    groups = norm_groups(model, readers, list(linears))
    for key, s in scales.items():
        kind, _, name = key.partition(":")
        if kind == "norm":
            if not fold_group(model, name, readers, groups[name], s):
                raise ValueError(f"the saved scales of {name!r} do not fold into this model")
            for member in groups[name]:
                _scale(linears[member], s, 1)
        else:
            head, _, leaf = name.rpartition(".")
            _scale(linears[name], s, 1)
            _scale(model.get_submodule(f"{head}.{PREVIOUS[leaf]}"), 1 / s, 0)


@contextmanager
def activation_scaling(model: nn.Module, readers: dict, linears: dict, recipe: Recipe, *rest):
    """The AWQ stage (`ActivationScaling(model, readers, linears, recipe, *rest)`: teacher, start block,
    this process's first sample) for `calibrate_sequential`'s callback, or None when the recipe has no
    scaling; its hook on the model is removed on exit."""
    if recipe.scaling.method == "none":
        yield None
        return
    stage = ActivationScaling(model, readers, linears, recipe, *rest)
    try:
        yield stage
    finally:
        stage.close()
