"""One per-layer plan type for both paths: a uniform recipe's choices and a budget allocation's choices
build identical layers through `apply_choice`."""

import torch

from lowbit.compress.allocate import Candidate
from lowbit.compress.plan import LayerChoice, allocated_choice, apply_choice, uniform_choice
from lowbit.compress.recipe import Recipe
from lowbit.lowrank import Stats, decompose
from lowbit.quantizers import QuantSpec, dequantize


def linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(64, 48, bias=True)


def test_uniform_choice_reads_the_recipe_with_overrides_and_excludes():
    recipe = Recipe.from_dict(
        {
            "quantize": {"format": "int3", "group_size": 32, "rounding": "gptq"},
            "decompose": {"method": "lorc", "rank": 8},
            "overrides": [{"match": "*.down_proj", "quantize": {"format": "int4"}}],
        }
    )
    expected = LayerChoice(QuantSpec("int3", 32), 8, "lorc", "gptq")
    assert uniform_choice(recipe, "m.layers.0.q_proj", 64) == expected
    assert uniform_choice(recipe, "m.layers.0.down_proj", 64).spec.format == "int4"
    assert uniform_choice(recipe, "lm_head", 64) is None


def test_allocated_choice_takes_the_candidate_and_the_recipes_method():
    section = {"allocate": {"budget": 3.0, "ranks": [0, 8]}, "quantize": {"rounding": "gptq"}}
    recipe = Recipe.from_dict(section)
    c = allocated_choice(Candidate(QuantSpec("int2", 64), 8), recipe)
    assert c == LayerChoice(QuantSpec("int2", 64), 8, "lorc", "gptq")  # ranks compete: LoRC


def test_both_paths_build_the_same_layer_from_the_same_choice():
    lin, recipe = linear(), Recipe()
    choice = LayerChoice(QuantSpec("int4", 32), 4, "lorc")
    a = apply_choice(lin, choice, recipe)
    b = apply_choice(lin, allocated_choice(Candidate(QuantSpec("int4", 32), 4), recipe_with_lorc()), recipe)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), n
    d = decompose(lin.weight.detach().float(), choice.spec, 4, "lorc")
    torch.testing.assert_close(dequantize(a.qtensor()) + a.l1.float() @ a.l2.float(), d.weight())
    assert torch.equal(a.bias, lin.bias)


def recipe_with_lorc():
    return Recipe.from_dict({"decompose": {"method": "lorc", "rank": 4}})


def test_shared_smoothing_is_stored_unless_folded():
    lin = linear(1)
    lam = torch.rand(64) + 0.5
    choice = LayerChoice(QuantSpec("int4", 32), 4, "svdquant")
    kept = apply_choice(lin, choice, Recipe(), Stats(), shared=(lam, False))
    folded = apply_choice(lin, choice, Recipe(), Stats(), shared=(lam, True))
    assert torch.equal(kept.smooth, lam) and folded.smooth is None
    assert torch.equal(kept.codes, folded.codes)
