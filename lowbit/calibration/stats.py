"""Calibration statistics of the linear layers y = x W^T of a decoder-only transformer (W: [N, K]).

Three statistics, each the data a paper's objective reads:

- ``act``: per-input-channel max |x_k| and mean x_k^2 over all calibration tokens ([K] fp32), the
  activation magnitudes by which AWQ (Lin et al. 2023) and SVDQuant (Li et al. 2024) smooth outlier
  channels.
- ``hessian``: X^T X summed over all calibration tokens ([K, K] fp32, X: [n, K]). GPTQ (Frantar et al.
  2022) minimises ||W X^T - Q X^T||_2^2 per layer (eq. 1), whose Hessian is H = 2 X^T X; like its
  reference code we normalise by the token count, H = 2/n X^T X (`LayerStats.hessian_matrix`), which
  leaves the solution unchanged.
- ``fisher``: the diagonal empirical Fisher of the weights, F = sum_s (dL_s/dW)^2 ([N, K] fp32) over
  calibration samples s, L_s the language-model loss of sample s: the weights of LQ-LoRA's data-aware
  objective ||sqrt(F) * (W - Q - L1 L2)||_F^2 (Guo et al. 2023). It needs full-model backward passes,
  one sample at a time.

Statistics are saved as safetensors (`{fqn}.act_max`, `{fqn}.act_sqmean`, `{fqn}.hessian`, `{fqn}.fisher`)
with the counts and provenance as JSON in the file's string metadata; never pickle.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from lowbit.parallel import World, all_reduce, share, world

STAT_KINDS = ("act", "hessian", "fisher")
FORMAT = "lowbit-calibration"
FORMAT_VERSION = 1
TENSOR_FIELDS = ("act_max", "act_sqmean", "hessian", "fisher")

LayerFilter = Collection[str] | Callable[[str], bool] | None


class CalibrationError(ValueError):
    """Calibration cannot run as asked (unknown architecture, bad token blocks, unknown layer, bad file)."""


@dataclass(eq=False)
class LayerStats:
    """Statistics of one linear layer's inputs x: [..., K] (and of its weight W: [N, K] for the Fisher).

    act_max:        fp32 [K] | None, max over tokens of |x_k|
    act_sqmean:     fp32 [K] | None, mean over tokens of x_k^2
    hessian:        fp32 [K, K] | None, sum over tokens of x x^T (un-normalised; see `hessian_matrix`)
    tokens:         number of input rows folded into the statistics above
    fisher:         fp32 [N, K] | None, sum over samples of (dL_s/dW)^2
    fisher_samples: number of samples summed into `fisher`
    """

    act_max: Tensor | None = None
    act_sqmean: Tensor | None = None
    hessian: Tensor | None = None
    tokens: int = 0
    fisher: Tensor | None = None
    fisher_samples: int = 0

    def update(self, x: Tensor, kinds: Collection[str]) -> None:
        """Fold a batch of layer inputs x: [..., K] into the running statistics named in `kinds`."""
        x = x.detach().reshape(-1, x.shape[-1]).float()  # x: [m, K]
        m, n = x.shape[0], self.tokens
        if m == 0:
            return
        if "act" in kinds:
            amax = x.abs().amax(dim=0)  # [K]
            sq = x.square().sum(dim=0)  # [K]
            self.act_max = amax if self.act_max is None else torch.maximum(self.act_max, amax)
            self.act_sqmean = sq / m if self.act_sqmean is None else (self.act_sqmean * n + sq) / (n + m)
        if "hessian" in kinds:
            xtx = x.T @ x  # [K, K]
            self.hessian = xtx if self.hessian is None else self.hessian.add_(xtx)
        self.tokens = n + m

    def hessian_matrix(self) -> Tensor:
        """GPTQ's normalised Hessian H = 2/n X^T X: fp32 [K, K]."""
        if self.hessian is None or self.tokens == 0:
            raise CalibrationError("these statistics hold no Hessian: calibrate with stats=('hessian', ...)")
        return self.hessian * (2.0 / self.tokens)


def hessians_in_turn(stats: dict[str, LayerStats], order: list[str]) -> Callable[[str], Tensor | None]:
    """take(name) -> the normalised Hessian 2/n X^T X of each layer of `order`, asked for in that order,
    each distinct input's Hessian held only until the last entry of `order` that reads it was given it
    (a name may come several times: one layer built for several plans).

    The first reader's call normalises the sum in place (the values `LayerStats.hessian_matrix` returns,
    bit for bit, without a second [K, K] copy); the last reader's call drops it from every LayerStats
    in `stats` that shares it, so the caller's reference is the last one and it is freed with that
    layer (for Llama-3-8B's block, down_proj's 0.82 GB Hessian is then the only one alive while it is
    quantized). The raw sums of `stats` are consumed: read them before, not after.
    """
    left: dict[int, int] = {}  # entries of `order` still to read each distinct Hessian
    for n in order:
        if stats[n].hessian is not None:
            left[id(stats[n].hessian)] = left.get(id(stats[n].hessian), 0) + 1
    ready: dict[int, Tensor] = {}

    def take(name: str) -> Tensor | None:
        st = stats[name]
        raw = st.hessian
        if raw is None:
            return None
        key = id(raw)
        if key not in ready:  # a sum holds tokens > 0
            ready[key] = raw.mul_(2.0 / st.tokens)
        H = ready[key]
        if key in left:
            left[key] -= 1
            if not left[key]:
                del ready[key], left[key]
                for other in stats.values():
                    if other.hessian is raw:
                        other.hessian = None
        return H

    return take


def rank_share(data: Tensor, w: World) -> Tensor:
    """This process's share of the token blocks data [S, L] (all of them for one process)."""
    if w.size > 1 and data.shape[0] < w.size:
        raise CalibrationError(f"{data.shape[0]} calibration samples cannot be shared by {w.size} processes")
    return data[share(data.shape[0], w)]


def reduce_stats(stats: dict[str, LayerStats], w: World) -> dict[str, LayerStats]:
    """Statistics over every rank's tokens, on every rank, in place: Hessians, token counts and Fisher
    diagonals summed, act_max the maximum, act_sqmean the token-weighted mean.

    The sums equal a single process's over the same tokens up to fp32 summation order (each rank adds
    its own micro-batches first): relative differences of about 1e-7 per entry.
    """
    groups: dict[int, list[LayerStats]] = {}  # layers reading one input share tensors: reduced once
    for name in sorted(stats):  # the same order on every rank
        st = stats[name]
        shared = st.hessian if st.hessian is not None else st.act_max
        groups.setdefault(id(st) if shared is None else id(shared), []).append(st)
    for members in groups.values():
        st = members[0]
        tokens = all_reduce(torch.tensor([st.tokens]), "sum", w)  # int64
        if st.act_max is not None:
            all_reduce(st.act_max, "max", w)
            st.act_sqmean.mul_(st.tokens)  # in place: the members hold this tensor too
            all_reduce(st.act_sqmean, "sum", w).div_(tokens.item())
        if st.hessian is not None:
            all_reduce(st.hessian, "sum", w)
        for m in members:
            m.tokens = int(tokens.item())
            if m.fisher is not None:
                all_reduce(m.fisher, "sum", w)
                m.fisher_samples = int(all_reduce(torch.tensor([m.fisher_samples]), "sum", w).item())
    return stats


@dataclass(eq=False)
class CalibrationStats:
    """Statistics of every calibrated linear layer, by fully qualified name, plus where they came from.

    samples x seq_len token blocks (tokens = samples * seq_len) drawn from `source` with `seed`.
    """

    layers: dict[str, LayerStats] = field(default_factory=dict)
    samples: int = 0
    seq_len: int = 0
    tokens: int = 0
    source: str = ""
    seed: int = 0

    def __getitem__(self, name: str) -> LayerStats:
        if name not in self.layers:
            raise KeyError(f"no calibration statistics for layer {name!r}")
        return self.layers[name]

    def save(self, path: str | Path) -> None:
        """Write the statistics to one safetensors file (tensors + JSON metadata)."""
        tensors, written = {}, set()
        for name, st in self.layers.items():
            for f in TENSOR_FIELDS:
                t = getattr(st, f)
                if t is not None:
                    t = t.detach().to("cpu", torch.float32).contiguous()
                    # layers reading one input share tensors; a file holds each under every name
                    tensors[f"{name}.{f}"] = t.clone() if t.data_ptr() in written else t
                    written.add(t.data_ptr())
        meta = {
            "samples": self.samples,
            "seq_len": self.seq_len,
            "tokens": self.tokens,
            "source": self.source,
            "seed": self.seed,
            "layers": {
                n: {"tokens": s.tokens, "fisher_samples": s.fisher_samples} for n, s in self.layers.items()
            },
        }
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "calibration": json.dumps(meta)}
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        """Read statistics written by `save`."""
        if not Path(path).is_file():
            raise CalibrationError(f"calibration statistics file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise CalibrationError(f"{path} is not a safetensors file: {e}") from None
        if metadata.get("format") != FORMAT or metadata.get("format_version") != str(FORMAT_VERSION):
            raise CalibrationError(
                f"{path} is not a lowbit calibration file (format version {FORMAT_VERSION})"
            )
        meta = json.loads(metadata["calibration"])
        layers = {
            n: LayerStats(tokens=c["tokens"], fisher_samples=c["fisher_samples"])
            for n, c in meta["layers"].items()
        }
        for key, t in tensors.items():
            name, f = key.rsplit(".", 1)
            if name not in layers or f not in TENSOR_FIELDS:
                raise CalibrationError(f"{path} holds an unexpected tensor {key!r}")
            setattr(layers[name], f, t)
        return cls(layers, meta["samples"], meta["seq_len"], meta["tokens"], meta["source"], meta["seed"])


def check_kinds(stats: Collection[str], allowed: Collection[str] = STAT_KINDS) -> tuple[str, ...]:
    """The requested statistic kinds, validated against `allowed`."""
    kinds = (stats,) if isinstance(stats, str) else tuple(stats)
    bad = [k for k in kinds if k not in allowed]
    if bad or not kinds:
        raise CalibrationError(f"stats must be a non-empty subset of {tuple(allowed)}, got {kinds}")
    return kinds


def check_tokens(model: nn.Module, data: Tensor, min_len: int = 1) -> Tensor:
    """Validate calibration token blocks: an integer tensor [S, L] of ids inside the model's vocabulary."""
    if (
        not isinstance(data, Tensor)
        or data.ndim != 2
        or data.dtype.is_floating_point
        or data.dtype == torch.bool
    ):
        got = f"{tuple(data.shape)} {data.dtype}" if isinstance(data, Tensor) else type(data).__name__
        raise CalibrationError(f"calibration data must be an integer tensor [samples, seq_len], got {got}")
    if data.shape[0] < 1 or data.shape[1] < min_len:
        raise CalibrationError(
            f"calibration data needs >= 1 sample of >= {min_len} tokens, got {tuple(data.shape)}"
        )
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    if int(data.min()) < 0 or (vocab is not None and int(data.max()) >= vocab):
        raise CalibrationError(
            f"token ids must lie in [0, {vocab}), got [{int(data.min())}, {int(data.max())}]"
        )
    return data.long()


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the largest nn.ModuleList whose length is config.num_hidden_layers (or n_layer)."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not isinstance(n, int):
        raise CalibrationError(
            f"{type(model).__name__} has no config.num_hidden_layers / n_layer: cannot find its blocks"
        )
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise CalibrationError(f"{type(model).__name__} has no nn.ModuleList of {n} decoder blocks")
    return max(found, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (the same map with its weight stored transposed, [K, N])."""
    return isinstance(module, (nn.Linear, Conv1D))


def select_linears(
    model: nn.Module, layers: LayerFilter = None, inside_blocks: bool = True
) -> dict[str, nn.Module]:
    """Linear layers by fully qualified name, in module order.

    layers: None (every linear inside the decoder blocks), a collection of names, or a predicate on names.
    inside_blocks: names outside the decoder blocks (lm_head) may be asked for only when False.
    """
    prefix, blocks = find_blocks(model)
    scope = blocks.named_modules(prefix=prefix) if inside_blocks or layers is None else model.named_modules()
    found = {name: m for name, m in scope if is_linear(m)}
    if layers is None:
        chosen = found
    elif callable(layers):
        chosen = {name: m for name, m in found.items() if layers(name)}
    else:
        missing = [name for name in layers if name not in found]
        if missing:
            where = f"inside the decoder blocks {prefix!r}" if inside_blocks else "of the model"
            raise CalibrationError(f"layer {missing[0]!r} is not a linear layer {where}")
        wanted = set(layers)
        chosen = {name: m for name, m in found.items() if name in wanted}
    if not chosen:
        raise CalibrationError("no linear layer selected for calibration")
    return chosen


def _weight_grad_nk(module: nn.Module) -> Tensor:
    """dL/dW as fp32 [N, K], whatever the layout the module stores its weight in."""
    g = module.weight.grad.float()
    return g.T if isinstance(module, Conv1D) else g


def _lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of one sample ids: [1, L], the loss of a causal language model."""
    out = model(input_ids=ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]  # [1, L, V]
    return nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])


def fisher_diagonal(
    model: nn.Module, data: Tensor, layers: LayerFilter = None, progress: bool = True
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher F = sum_s (dL_s/dW)^2 of each selected weight (LQ-LoRA, Guo et al. 2023).

    data: token blocks [S, L]; one backward pass per sample, gradients only for the selected weights,
    squares accumulated into fp32 [N, K] buffers and the gradients dropped after each sample, so memory
    stays near the model plus one set of gradients plus the Fisher buffers. L_s is the mean next-token
    cross-entropy of sample s. The model is left as it was (weights, grads, requires_grad, training flag).
    layers: as `select_linears`, here any linear layer of the model (lm_head too). Under several
    processes each takes its share of the samples and F is summed over them.
    """
    data = check_tokens(model, data, min_len=2)
    ranks = world()
    data = rank_share(data, ranks)
    modules = select_linears(model, layers, inside_blocks=False)
    device = model.get_input_embeddings().weight.device
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = {id(m.weight): (m.weight, m.weight.grad) for m in modules.values()}
    was_training = model.training
    F = {
        name: torch.zeros(_weight_grad_shape(m), dtype=torch.float32, device=m.weight.device)
        for name, m in modules.items()
    }
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        for w, _ in grads.values():
            w.requires_grad_(True)
            w.grad = None
        with torch.enable_grad():
            for s in tqdm(range(data.shape[0]), desc="fisher", disable=not progress):
                _lm_loss(model, data[s : s + 1].to(device)).backward()
                for name, m in modules.items():
                    F[name].add_(_weight_grad_nk(m).square())
                for w, _ in grads.values():
                    w.grad = None
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        for w, g in grads.values():
            w.grad = g
        model.train(was_training)
    for name in F:  # the same order on every rank
        all_reduce(F[name], "sum", ranks)
    return F


def _weight_grad_shape(module: nn.Module) -> tuple[int, int]:
    """[N, K] of a linear layer's map, whatever its storage layout."""
    N, K = module.weight.shape
    return (K, N) if isinstance(module, Conv1D) else (N, K)
