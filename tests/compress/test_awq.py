"""AWQ (lowbit.compress.awq): scales folded into the norms leave the float model's logits unchanged, and
at int3 g128 the scaled (and clipped) model's block output is closer to the float model's than plain
round-to-nearest's, on a tiny random Llama whose norms make a few input channels outliers."""

import copy

import pytest
import torch
from torch import nn

from lowbit.calibration import LayerStats, calibrate_sequential
from lowbit.compress import awq
from lowbit.compress.awq import ActivationScaling, awq_scales, scaled_stats
from lowbit.compress.presets import preset
from lowbit.compress.recipe import Recipe, RecipeError
from lowbit.compress.uniform import quantize_model
from lowbit.nn.smoothing import norm_readers
from tests.compress.test_smoothing import with_outlier_norms
from tests.conftest import logits, make_tiny_llama

CALIB = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
FAST = {"grid": 5, "samples": 4}  # a coarser grid than AWQ's 20 keeps the tests fast
NORMS = ("input_layernorm", "post_attention_layernorm")


def outlier_llama() -> nn.Module:
    """hidden 128 (one int3 g128 group per row of q/k/v/gate/up), norms with 20x outlier channels."""
    return with_outlier_norms(make_tiny_llama(300, hidden_size=128, intermediate_size=256))


def awq_recipe(**scaling) -> Recipe:
    return Recipe.from_dict(
        {"quantize": {"format": "int3", "group_size": 128}, "scaling": {"method": "awq", **FAST, **scaling}}
    )


def test_awq_scales_normalised_and_alpha_zero_is_identity():
    s_x = torch.tensor([0.5, 2.0, 8.0, 1.0])
    assert torch.equal(awq_scales(s_x, 0.0), torch.ones(4))
    s = awq_scales(s_x, 0.5)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0))
    assert torch.allclose(s / s[0], (s_x / s_x[0]).sqrt())


def test_scaled_stats_are_those_of_scaled_inputs():
    x = torch.randn(50, 6)
    s = torch.rand(6) + 0.5
    st, ref = LayerStats(), LayerStats()
    st.update(x, ("act", "hessian"))
    ref.update(x / s, ("act", "hessian"))
    got = scaled_stats(st, s)
    for field in ("act_max", "act_sqmean", "hessian"):
        assert torch.allclose(getattr(got, field), getattr(ref, field), rtol=1e-5, atol=1e-6), field


def scale_float_model(model: nn.Module) -> ActivationScaling:
    """AWQ's scale search and folds on every block of `model`, its weights left unquantized."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    stage = ActivationScaling(model, norm_readers(model, CALIB[:1, :16]), linears, awq_recipe(clip=False))
    calibrate_sequential(model, CALIB, on_block=stage, propagate="original", progress=False)
    stage.close()
    return stage


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_folded_scales_leave_float_logits_unchanged(kv_heads):
    """Norm folds, up -> down folds, and v -> o folds where the heads are not grouped."""
    model = with_outlier_norms(
        make_tiny_llama(300, hidden_size=128, intermediate_size=256, num_key_value_heads=kv_heads)
    )
    before = copy.deepcopy(model)
    stage = scale_float_model(model)
    assert any(a > 0 for n, a in stage.alphas.items() if n.endswith("norm"))
    assert any(a > 0 for n, a in stage.alphas.items() if n.endswith("down_proj"))
    assert any(n.endswith("o_proj") for n in stage.alphas) == (kv_heads == 4)
    for i, block in enumerate(model.model.layers):
        for norm in NORMS:
            weight, old = block.get_submodule(norm).weight, before.model.layers[i].get_submodule(norm).weight
            assert torch.equal(weight, old) == (stage.alphas[f"model.layers.{i}.{norm}"] == 0)
    ref, got = logits(before, HELD_OUT), logits(model, HELD_OUT)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_fold_into_previous_kept_only_where_exact(monkeypatch):
    """gate_proj's output reaches down_proj through SiLU: a fold there would change the block, so it is
    undone and the logits stay."""
    monkeypatch.setattr(awq, "PREVIOUS", {"down_proj": "gate_proj"})
    model = outlier_llama()
    before = copy.deepcopy(model)
    stage = scale_float_model(model)
    assert not any(n.endswith("down_proj") for n in stage.alphas)
    ref, got = logits(before, HELD_OUT), logits(model, HELD_OUT)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def block0_error(model: nn.Module, reference: nn.Module) -> float:
    """Mean squared difference of block 0's output from the reference model's, on held-out tokens."""
    outs = []
    for m in (model, reference):
        hook = m.model.layers[0].register_forward_hook(lambda _, a, out: outs.append(out))
        logits(m, HELD_OUT)
        hook.remove()
    got, ref = (o[0] if isinstance(o, tuple) else o for o in outs)
    return float((got - ref).square().mean())


@pytest.mark.parametrize("rounding,objective", [("nearest", "block"), ("gptq", "layers")])
def test_awq_lowers_block_error_at_int3_g128(rounding, objective):
    original = outlier_llama()
    errors = {}
    awq = {"method": "awq", "objective": objective, **FAST}
    for name, scaling in {"plain": {}, "scaled": {**awq, "clip": False}, "awq": awq}.items():
        recipe = Recipe.from_dict(
            {"quantize": {"format": "int3", "group_size": 128, "rounding": rounding}, "scaling": scaling}
        )
        model = copy.deepcopy(original)
        quantize_model(model, recipe, calib_data=CALIB, progress=False)
        errors[name] = block0_error(model, original)
    assert errors["scaled"] < 0.8 * errors["plain"], errors
    assert errors["awq"] < errors["plain"], errors


def test_recipe_scaling_section_and_presets():
    r = preset("int3-g128-awq")
    assert r.scaling.method == "awq" and r.scaling.grid == 20 and r.scaling.clip
    assert r.needs_calibration() and preset("int4-g128-awq").quantize.format == "int4"
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(RecipeError, match="unknown scaling.method"):
        Recipe.from_dict({"scaling": {"method": "smooth"}})
    with pytest.raises(RecipeError, match="budget"):
        Recipe.from_dict({"scaling": {"method": "awq"}, "allocate": {"budget": 3.0}})
    with pytest.raises(RecipeError, match="rank 0"):
        Recipe.from_dict({"scaling": {"method": "awq"}, "decompose": {"method": "lorc", "rank": 8}})
    with pytest.raises(RecipeError, match="clip_max_shrink"):
        Recipe.from_dict({"scaling": {"method": "awq", "clip_max_shrink": 1.0}})
