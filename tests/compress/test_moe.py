"""Every decoder-block weight counted: fused expert tensors refused by name unless excluded, what stays
unquantized listed, bits per weight over all block weights."""

import dataclasses

import pytest
import torch
import transformers

from lowbit.compress import dry_run
from lowbit.compress.api import compress
from lowbit.compress.presets import PRESETS
from lowbit.compress.uniform import CompressError, block_bits_per_weight
from tests.conftest import make_tiny_llama

EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def tiny_mixtral():
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_fused_experts_are_refused_by_name(tmp_path):
    for run in (lambda: dry_run(tiny_mixtral()), lambda: compress(tiny_mixtral(), out=tmp_path / "o")):
        with pytest.raises(CompressError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj.*exclude"):
            run()
    assert not (tmp_path / "o").exists()


def test_excluded_experts_are_listed_and_counted():
    recipe = dataclasses.replace(PRESETS["int4-g128"], exclude=("lm_head", "*.experts.*"))
    plan = dry_run(tiny_mixtral(), recipe)
    model, report = compress(tiny_mixtral(), recipe, progress=False)
    bpw, left = block_bits_per_weight(model, report.layers)
    expected = [f"model.layers.{i}.mlp.{n}" for i in (0, 1) for n in ("gate.weight", *EXPERTS)]
    assert left == expected and list(plan.unquantized) == expected
    attention = 2 * (64 * 64 * 2 + 32 * 64 * 2)
    others = 2 * (4 * 64 + 4 * 192 * 64 + 4 * 64 * 96)
    assert plan.block_params == attention + others and plan.quantized_params == attention
    assert bpw == pytest.approx((report.bits_per_weight * attention + 32 * others) / (attention + others))
    assert plan.block_bits_per_weight[0] == pytest.approx(bpw, rel=1e-12)


def test_dense_model_block_bits_equal_the_quantized_bits():
    model, report = compress(make_tiny_llama(300), "int4-g128", progress=False)
    bpw, left = block_bits_per_weight(model, report.layers)
    assert left == [] and bpw == pytest.approx(report.bits_per_weight, rel=1e-12)
