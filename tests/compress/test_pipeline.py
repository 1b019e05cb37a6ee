"""The compress pipeline on a tiny random Llama: every decomposition method and rounding, end to end."""

from dataclasses import replace

import pytest
import torch

import lowbit
from lowbit.compress.api import compress
from lowbit.compress.recipe import Recipe
from lowbit.compress.uniform import CompressError
from lowbit.nn.checkpoint import plan_bits
from lowbit.nn.qlinear import QLinear
from tests.conftest import make_tiny_llama

SEQ = 32


@pytest.fixture(scope="module")
def blocks():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 300, (8, SEQ), generator=g)


def output_error(model, reference, blocks) -> float:
    with torch.no_grad():
        return (model(blocks).logits - reference(blocks).logits).pow(2).mean().item()


def recipe(quantize: dict, decompose: dict | None = None) -> Recipe:
    return Recipe.from_dict(
        {"quantize": quantize, "decompose": decompose or {}, "calibration": {"samples": 8, "seq_len": SEQ}}
    )


@pytest.mark.parametrize(
    "quantize, decompose",
    [
        ({"format": "int3", "group_size": 32, "rounding": "gptq"}, None),
        ({"format": "nf3", "group_size": 32}, {"method": "lorc", "rank": 4}),
        ({"format": "int3", "group_size": 32}, {"method": "lqlora", "rank": 4, "iterations": 3}),
        ({"format": "int3", "group_size": 32}, {"method": "lqlora-fisher", "rank": 4, "iterations": 3}),
        ({"format": "int3", "group_size": 32, "rounding": "gptq"}, {"method": "svdquant", "rank": 4}),
        ({"format": "fp4_e2m1", "group_size": 32}, None),
    ],
)
def test_every_method_compresses_saves_and_reloads(tmp_path, blocks, quantize, decompose):
    reference = make_tiny_llama(300)
    model, report = compress(
        make_tiny_llama(300), recipe(quantize, decompose), tmp_path / "ck", calib_data=blocks, progress=False
    )
    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    assert len(qlinears) == 14 and set(report.layers) == set(qlinears)
    rank = (decompose or {}).get("rank", 0)
    assert all(m.rank == rank for m in qlinears.values())
    assert report.bits_per_weight == plan_bits(model, report.layers) / report.quantized_params
    reloaded = lowbit.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(reloaded(blocks).logits, model(blocks).logits)
    # a 3-bit model is not the original, but it is close to it
    assert 0 < output_error(model, reference, blocks) < 0.1 * reference(blocks).logits.var().item()


def test_gptq_and_lowrank_beat_round_to_nearest(blocks):
    reference = make_tiny_llama(300)
    errors = {}
    for name, (q, d) in {
        "rtn": ({"format": "int2", "group_size": 32}, None),
        "gptq": ({"format": "int2", "group_size": 32, "rounding": "gptq"}, None),
        "lqlora": ({"format": "int2", "group_size": 32}, {"method": "lqlora", "rank": 8, "iterations": 3}),
    }.items():
        model, _ = compress(make_tiny_llama(300), recipe(q, d), calib_data=blocks, progress=False)
        errors[name] = output_error(model, reference, blocks)
    assert errors["gptq"] < errors["rtn"]
    assert errors["lqlora"] < errors["rtn"]


def test_calibrated_recipe_without_data_or_tokenizer_is_refused():
    with pytest.raises(CompressError, match="calibration data"):
        compress(make_tiny_llama(300), recipe({"rounding": "gptq"}), progress=False)


def test_recipe_selecting_nothing_is_refused():
    with pytest.raises(CompressError, match="selects no linear"):
        compress(make_tiny_llama(300), Recipe.from_dict({"exclude": ["*"]}), progress=False)


def test_bits_per_weight_counts_lowrank(blocks):
    plain, r0 = compress(make_tiny_llama(300), recipe({"format": "int4"}), progress=False)
    lowrank, r8 = compress(
        make_tiny_llama(300), recipe({"format": "int4"}, {"method": "lorc", "rank": 8}), progress=False
    )
    # each layer [N, K] gains r * (N + K) low-rank weights, stored in float16 by default
    extra = sum(8 * sum(e["shape"]) * 16 for e in r8.layers.values())
    assert r8.bits_per_weight * r8.quantized_params == r0.bits_per_weight * r0.quantized_params + extra


def test_recipe_finetune_stage_runs_and_is_validated(blocks):
    from lowbit.compress.recipe import RecipeError

    with pytest.raises(RecipeError, match="finetune"):
        Recipe.from_dict({"finetune": {"mode": "dance"}})
    r = Recipe.from_dict(
        {
            "quantize": {"format": "int3", "group_size": 32},
            "decompose": {"method": "lorc", "rank": 4},
            "finetune": {"mode": "lora", "objective": "distill", "steps": 2, "batch_size": 2, "seq_len": SEQ},
        }
    )
    assert Recipe.from_dict(r.to_dict()) == r
    model, report = compress(make_tiny_llama(300), r, calib_data=blocks, progress=False)
    before, _ = compress(make_tiny_llama(300), replace(r, finetune=None), calib_data=blocks, progress=False)
    name = "model.layers.0.mlp.up_proj"
    a, b = model.get_submodule(name), before.get_submodule(name)
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.l1, b.l1)  # lora trains only L1, L2
    assert report.layers[name]["rank"] == 4
