"""QuaRot's randomized Hadamard rotation (lowbit.quantizers.hadamard, lowbit.compress.rotation): the
matrices are Hadamard / orthogonal, and the residual-stream rotation folded into a Llama leaves its float
logits unchanged while changing every weight it touches."""

import copy

import pytest
import torch

from lowbit.compress.rotation import RotationError, rotate_residual
from lowbit.quantizers import QuantInputError
from lowbit.quantizers.hadamard import hadamard, random_hadamard
from tests.compress.test_smoothing import with_outlier_norms
from tests.conftest import logits, make_tiny_llama


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
