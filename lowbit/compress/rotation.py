"""The residual-stream rotation of QuaRot (Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in
Rotated LLMs", sec. 4.1; SliceGPT's computational invariance, Ashkboos et al. 2024, sec. 3) folded into a
Llama-style model's weights, so that the float model computes the same logits.

With an orthogonal R [D, D] (R R^T = I), the residual stream h [.., D] is carried as h R:

1. RMSNorm(x) = g * x / rms(x) commutes with R only without its weight g, so each norm's g is first
   absorbed into the linears reading it (W <- W diag(g), g <- 1), the final norm's into lm_head;
2. the embedding writes rotated rows, E <- E R;
3. the readers of the stream (q/k/v, gate/up, lm_head) take W <- W R, since (x R)(W R)^T = x W^T;
4. the writers into the stream (o_proj, down_proj) take W <- R^T W (and b <- b R), so they add y R.

rms(x R) = rms(x), so every norm then sees its input rotated and returns its output rotated. A tied
lm_head is untied first (its weight takes the final norm's g, the embedding does not).

Two more rotations, each exact in float on its own (QuaRot sec. 4.1-4.2, Fig. 4):

- per head (`rotate_heads`): with R_h [d, d] (d = head_dim), each value head carries v_h R_h: v_proj's
  output rows per head take W_v,h <- R_h^T W_v,h (b <- b R_h); attention mixes tokens linearly, so each
  head's output is o_h R_h, and o_proj's input columns per head take W_o,h <- W_o,h R_h;
- online, before down_proj (`rotate_down`): with R = diag(s) R_d, s random +-1 [F] and R_d =
  `online_matrix(F)` (F the intermediate size), up_proj's rows take the signs (W_up <- diag(s) W_up), so
  down_proj's input z becomes z diag(s), then down_proj takes W <- W diag(s) R_d and multiplies its input
  by R_d at run time (`add_online_hadamard`): (z diag(s) R_d)(W diag(s) R_d)^T = z W^T. R_d is not folded
  anywhere, since act(gate) * up is not linear in the rows of gate; it is applied online, O(F log F).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.kernels.reference import hadamard_transform
from lowbit.nn.qlinear import ONLINE, add_online_hadamard
from lowbit.quantizers.hadamard import random_hadamard
from lowbit.quantizers.spec import QuantInputError

READERS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


class RotationError(ValueError):
    """The model is not one whose residual stream this module knows how to rotate."""


def _parts(model: nn.Module) -> tuple[nn.Embedding, nn.ModuleList, nn.Module, nn.Linear]:
    """(embedding, decoder blocks, final norm, lm_head) of a Llama-style causal LM, checked."""
    inner = getattr(model, "model", None)
    parts = [getattr(inner, n, None) for n in ("embed_tokens", "layers", "norm")] + [
        getattr(model, "lm_head", None)
    ]
    names = {*READERS, *(r for rs in READERS.values() for r in rs), *WRITERS}
    blocks_ok = parts[1] is not None and all({n for n, _ in b.named_modules()} >= names for b in parts[1])
    if None in parts or not blocks_ok:
        raise RotationError(f"{type(model).__name__} is not a Llama-style model (embed_tokens, layers, norm)")
    norms = [parts[2]] + [b.get_submodule(n) for b in parts[1] for n in READERS]
    if any(getattr(m, "bias", None) is not None or getattr(m, "weight", None) is None for m in norms):
        raise RotationError("rotation needs RMSNorm-style norms (a weight and no bias)")
    return parts[0], parts[1], parts[2], parts[3]


@torch.no_grad()
def _absorb(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """W <- W diag(g) for each reader, g <- 1 (step 1)."""
    g = norm.weight.data.float()
    for m in readers:
        m.weight.data = (m.weight.data.float() * g[None, :]).to(m.weight.dtype)
    norm.weight.data = torch.ones_like(norm.weight.data)


def _rotate(m: nn.Module, R: torch.Tensor, side: str) -> None:
    """W <- W R (side "in": a reader of the stream) or W <- R^T W, b <- b R ("out": a writer); R float64."""
    W = m.weight.data
    m.weight.data = (W.double() @ R if side == "in" else R.T @ W.double()).to(W.dtype)
    if side == "out" and getattr(m, "bias", None) is not None:
        m.bias.data = (m.bias.data.double() @ R).to(m.bias.dtype)


@torch.no_grad()
def _residual_block(block: nn.Module, R: torch.Tensor) -> None:
    """Steps 1, 3 and 4 on one decoder block (R float64 [D, D])."""
    for norm, names in READERS.items():
        readers = [block.get_submodule(n) for n in names]
        _absorb(block.get_submodule(norm), readers)
        for m in readers:
            _rotate(m, R, "in")
    for name in WRITERS:
        _rotate(block.get_submodule(name), R, "out")


@torch.no_grad()
def _residual_outside(model: nn.Module, R: torch.Tensor, tied: bool) -> None:
    """Steps 1-3 on the tensors outside the blocks: lm_head (untied first when `tied`: a copy of the
    embedding) takes the final norm's g and R, the embedding E R."""
    embed, _, final_norm, lm_head = _parts(model)
    if tied:
        lm_head.weight = nn.Parameter(embed.weight.data.clone())
    _absorb(final_norm, [lm_head])
    _rotate(lm_head, R, "in")
    embed.weight.data = (embed.weight.data.double() @ R).to(embed.weight.dtype)


def _check_residual(model: nn.Module, R: torch.Tensor) -> None:
    D = _parts(model)[0].weight.shape[1]
    if tuple(R.shape) != (D, D):
        raise RotationError(f"rotation must be [{D}, {D}] for this model, got {tuple(R.shape)}")


@torch.no_grad()
def rotate_residual(model: nn.Module, R: torch.Tensor) -> None:
    """Fold the residual-stream rotation R [D, D] (orthogonal) into the model's weights, in place."""
    embed, blocks, _, lm_head = _parts(model)
    _check_residual(model, R)
    tied = lm_head.weight is embed.weight  # lm_head takes the final norm's weight, the embedding not
    if tied:
        model.config.tie_word_embeddings = False
    for block in blocks:
        _residual_block(block, R.double())
    _residual_outside(model, R.double(), tied)


@torch.no_grad()
def _set(m: nn.Linear, W: torch.Tensor, b: torch.Tensor | None = None) -> None:
    """Store the float64 results W [N, K] (and b [N]) back in the layer's dtypes."""
    m.weight.data = W.to(m.weight.dtype)
    if b is not None:
        m.bias.data = b.to(m.bias.dtype)


def _bias(m: nn.Linear) -> torch.Tensor | None:
    return None if getattr(m, "bias", None) is None else m.bias.data.double()


def head_dim(model: nn.Module) -> int:
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_heads(model: nn.Module, R: torch.Tensor) -> int:
    """head_dim d, once R [d, d] and every block's v_proj / o_proj widths are checked."""
    d = head_dim(model)
    if tuple(R.shape) != (d, d):
        raise RotationError(f"head rotation must be [{d}, {d}] for this model, got {tuple(R.shape)}")
    for block in _parts(model)[1]:
        v, o = block.get_submodule("self_attn.v_proj"), block.get_submodule("self_attn.o_proj")
        if v.out_features % d or o.in_features % d:
            raise RotationError(f"v_proj / o_proj widths are not multiples of head_dim {d}")
    return d


@torch.no_grad()
def _heads_block(block: nn.Module, R: torch.Tensor, d: int) -> None:
    """The per-head rotation R [d, d] (float64) on one block's v_proj and o_proj."""
    v, o = block.get_submodule("self_attn.v_proj"), block.get_submodule("self_attn.o_proj")
    Wv = v.weight.data.double().unflatten(0, (-1, d))  # [H_kv, d, D]: W_v,h <- R^T W_v,h
    b = _bias(v)
    _set(v, (R.T @ Wv).flatten(0, 1), None if b is None else (b.unflatten(0, (-1, d)) @ R).flatten())
    Wo = o.weight.data.double().unflatten(1, (-1, d))  # [D, H, d]: W_o,h <- W_o,h R
    _set(o, (Wo @ R).flatten(1))


@torch.no_grad()
def rotate_heads(model: nn.Module, R: torch.Tensor) -> None:
    """Fold the per-head rotation R [d, d] into every block's v_proj (output rows) and o_proj (input
    columns), in place: v_h -> v_h R, o_h -> o_h R, o_proj's output unchanged."""
    d = _check_heads(model, R)
    for block in _parts(model)[1]:
        _heads_block(block, R.double(), d)


def _check_down(name: str, F: int) -> None:
    """RotationError when F (the intermediate size) has no Hadamard order built here."""
    try:
        hadamard_transform(torch.zeros(1, F, dtype=torch.float64))
    except QuantInputError:
        raise RotationError(
            f"{name}: no Hadamard matrix of order {F} (the intermediate size) is built here; "
            "set rotate.online_down false"
        ) from None


@torch.no_grad()
def _down_block(block: nn.Module, seed: int) -> None:
    """The online rotation diag(s) R_d (s seeded by `seed`) folded into one block's up_proj and down_proj,
    and the online transform given to down_proj (once: the module keeps it when its weights are read
    again)."""
    up, down = block.get_submodule("mlp.up_proj"), block.get_submodule("mlp.down_proj")
    F = down.in_features
    g = torch.Generator().manual_seed(seed)
    s = (torch.randint(0, 2, (F,), generator=g) * 2 - 1).double()  # s: [F], +-1
    # W diag(s) R_d, row by row through the fast transform: O(D F log F), not O(D F^2)
    W_down = hadamard_transform(down.weight.data.double() * s)  # [D, F]
    b = _bias(up)
    _set(up, up.weight.data.double() * s[:, None], None if b is None else b * s)  # diag(s) W_up
    _set(down, W_down)
    if not getattr(down, ONLINE, False):
        add_online_hadamard(down)


def _downs(model: nn.Module, layers: set[str] | None) -> dict[int, str]:
    """{block index: down_proj name} of the blocks whose down_proj is rotated (layers None: all), checked."""
    _, blocks, _, _ = _parts(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    names = {i: f"{prefix}.{i}.mlp.down_proj" for i in range(len(blocks))}
    chosen = {i: n for i, n in names.items() if layers is None or n in layers}
    for i, name in chosen.items():
        _check_down(name, blocks[i].get_submodule("mlp.down_proj").in_features)
    return chosen


@torch.no_grad()
def rotate_down(model: nn.Module, seed: int, layers: set[str] | None = None) -> list[str]:
    """Fold the online rotation diag(s) R_d into every block's up_proj (signs) and down_proj (W diag(s) R_d)
    and give down_proj the online transform x -> x R_d, in place; layers: the down_proj names to rotate
    (None: all). Returns the names rotated. RotationError when F has no Hadamard order built here."""
    blocks = _parts(model)[1]
    chosen = _downs(model, layers)
    for i in chosen:
        _down_block(blocks[i], seed + i)
    return list(chosen.values())


def _matrices(model: nn.Module, config) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(R [D, D], R_h [d, d]) in float64 as the recipe asks (None where it does not), checked."""
    R = R_h = None
    try:
        if config.residual:
            R = random_hadamard(_parts(model)[0].weight.shape[1], config.seed, torch.float64)
        if config.heads:
            R_h = random_hadamard(head_dim(model), config.seed + 1, torch.float64)
    except QuantInputError as e:
        raise RotationError(f"rotation: {e}") from None
    return R, R_h


def rotate_model(model: nn.Module, config, selected: list[str]) -> None:
    """The recipe's rotations (`lowbit.compress.recipe.RotateConfig`), in place, those it asks for: the
    residual stream (R = random_hadamard(D, seed)), the value heads (R_h = random_hadamard(head_dim,
    seed + 1)) and the online rotation before the down_proj layers among `selected` (the layers to be
    quantized: a down_proj left as an nn.Linear keeps its weight, as no checkpoint stores its transform)."""
    if config.method == "none":
        return
    R, R_h = _matrices(model, config)
    if R is not None:
        rotate_residual(model, R)
    if R_h is not None:
        rotate_heads(model, R_h)
    if config.online_down:
        rotate_down(model, config.seed + 2, {n for n in selected if n.endswith(".mlp.down_proj")})


class BlockRotation:
    """`rotate_model` one part at a time, for a model read part by part (a `StreamedFolder`'s fold, called
    each time a part is read: decoder block i, or None for the embedding, final norm and lm_head). Each
    tensor takes the operations `rotate_model` gives it, in the same order, so the model read this way
    equals the rotated whole model bit for bit. Built on the model's skeleton (shapes only), which it
    checks; a tied lm_head is written untied (config.tie_word_embeddings is set false)."""

    def __init__(self, model: nn.Module, config, selected: list[str]):
        embed, _, _, lm_head = _parts(model)
        self.model, self.R, self.R_h = model, *_matrices(model, config)
        self.tied = lm_head.weight is embed.weight or bool(
            getattr(model.config, "tie_word_embeddings", False)
        )
        if self.R is not None:
            _check_residual(model, self.R)
            if self.tied:
                model.config.tie_word_embeddings = False
        self.d = None if self.R_h is None else _check_heads(model, self.R_h)
        downs = {n for n in selected if n.endswith(".mlp.down_proj")}
        self.downs = _downs(model, downs) if config.online_down else {}
        self.seed = config.seed + 2

    def __call__(self, index: int | None) -> None:
        if index is None:
            if self.R is not None:
                _residual_outside(self.model, self.R, self.tied)
            return
        block = _parts(self.model)[1][index]
        if self.R is not None:
            _residual_block(block, self.R)
        if self.R_h is not None:
            _heads_block(block, self.R_h, self.d)
        if index in self.downs:
            _down_block(block, self.seed + index)
