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
"""

from __future__ import annotations

import torch
from torch import nn

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


@torch.no_grad()
def rotate_residual(model: nn.Module, R: torch.Tensor) -> None:
    """Fold the residual-stream rotation R [D, D] (orthogonal) into the model's weights, in place."""
    embed, blocks, final_norm, lm_head = _parts(model)
    D = embed.weight.shape[1]
    if tuple(R.shape) != (D, D):
        raise RotationError(f"rotation must be [{D}, {D}] for this model, got {tuple(R.shape)}")
    if lm_head.weight is embed.weight:  # tied: lm_head takes the final norm's weight, the embedding not
        lm_head.weight = nn.Parameter(embed.weight.data.clone())
        model.config.tie_word_embeddings = False
    R = R.double()

    def rotate(m: nn.Module, side: str) -> None:
        W = m.weight.data
        m.weight.data = (W.double() @ R if side == "in" else R.T @ W.double()).to(W.dtype)
        if side == "out" and getattr(m, "bias", None) is not None:
            m.bias.data = (m.bias.data.double() @ R).to(m.bias.dtype)

    for block in blocks:
        for norm, names in READERS.items():
            readers = [block.get_submodule(n) for n in names]
            _absorb(block.get_submodule(norm), readers)
            for m in readers:
                rotate(m, "in")
        for name in WRITERS:
            rotate(block.get_submodule(name), "out")
    _absorb(final_norm, [lm_head])
    rotate(lm_head, "in")
    embed.weight.data = (embed.weight.data.double() @ R).to(embed.weight.dtype)
