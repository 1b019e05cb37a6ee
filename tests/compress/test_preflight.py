"""dry_run: the plan from config and shapes alone, its validation before any weight is read."""

import json
from dataclasses import replace

import pytest

from lowbit.calibration.data import DataError
from lowbit.compress import dry_run
from lowbit.compress.allocate import AllocationError
from lowbit.compress.api import compress
from lowbit.compress.preflight import block_work_bytes
from lowbit.compress.presets import PRESETS
from lowbit.compress.recipe import RecipeError
from lowbit.compress.uniform import CompressError
from lowbit.models import ModelError, source


def folder_bytes(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("preset", ["int4-g128", "nf3-g64-lorc-r16", "int8"])
def test_predicted_output_matches_the_written_checkpoint(tiny_llama_dir, tmp_path, preset):
    plan = dry_run(str(tiny_llama_dir), preset)
    _, report = compress(str(tiny_llama_dir), preset, tmp_path / "out", progress=False)
    assert plan.quantized_params == report.quantized_params
    assert plan.layers == len(report.layers)
    assert plan.bits_per_weight[0] == pytest.approx(report.bits_per_weight, rel=1e-12)
    real = folder_bytes(tmp_path / "out")
    assert abs(plan.output_bytes[0] - real) / real < 0.03
    assert plan.unquantized == () and plan.block_params == plan.quantized_params


def test_dry_run_reads_no_weight(tiny_llama_dir, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("dry_run must not load the model")

    monkeypatch.setattr(source, "from_pretrained", forbidden)
    monkeypatch.setattr(source, "load_gguf", forbidden)
    plan = dry_run(str(tiny_llama_dir), "int4-g128")
    assert plan.params > plan.quantized_params > 0 and plan.peak_ram_bytes > plan.output_bytes[0]
    assert json.loads(json.dumps(plan.to_dict()))["layers"] == plan.layers


def test_budget_plan_and_infeasible_budget(tiny_llama_dir, news_file):
    recipe = PRESETS["alloc-int"]
    recipe = replace(recipe, calibration=replace(recipe.calibration, data=str(news_file)))
    plan = dry_run(str(tiny_llama_dir), recipe, budgets=[3.0, 4.0])
    assert plan.budgets == (3.0, 4.0) and plan.bits_per_weight == pytest.approx((3.0, 4.0), abs=1e-3)
    assert plan.output_bytes[0] < plan.output_bytes[1] and plan.work_bytes > 0
    with pytest.raises(AllocationError, match="infeasible"):
        dry_run(str(tiny_llama_dir), recipe, budget=1.5)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(recipe="int5-g7"), RecipeError, "recipe must be"),
        (dict(model="/no/such/model"), ModelError, "does not exist"),
        (dict(recipe=replace(PRESETS["int4-g128"], exclude=("*",))), CompressError, "selects no linear"),
        (dict(data="/no/such/calib.txt"), DataError, "does not exist"),
        (dict(data="calib.csv"), DataError, "unsupported text file|does not exist"),
        (dict(data="builtin:nope"), DataError, "unknown built-in text"),
    ],
)
def test_bad_jobs_are_refused_before_loading(tiny_llama_dir, monkeypatch, kwargs, error, message):
    monkeypatch.setattr(source, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    recipe = kwargs.get("recipe", PRESETS["int4-g128-gptq"])
    if "data" in kwargs:
        recipe = replace(recipe, calibration=replace(recipe.calibration, data=kwargs["data"]))
    with pytest.raises(error, match=message):
        dry_run(kwargs.get("model", str(tiny_llama_dir)), recipe)


def test_block_work_model_grows_with_the_square_of_the_widest_input():
    """The predicted working set of a calibrated block: one [K, K] Hessian per distinct input (q/k/v
    share one), and for the widest input its Hessian, GPTQ's inverse factor (or the X^T X being
    summed) beside it: 8 K^2 bytes more per K^2; round to nearest holds no Hessian."""
    gptq, rtn = PRESETS["int4-g128-gptq"], PRESETS["int4-g128"]
    prefix = "model.layers.0."

    def block(k_down: int, qkv=("q_proj",)) -> dict:
        layers = {f"{prefix}self_attn.{n}": (64, 128) for n in qkv}
        return layers | {f"{prefix}mlp.down_proj": (64, k_down)}

    small, big = block_work_bytes(gptq, block(1000)), block_work_bytes(gptq, block(2000))
    assert big - small >= 8 * (2000**2 - 1000**2)
    assert block_work_bytes(rtn, block(2000)) - block_work_bytes(rtn, block(1000)) == 16 * 64 * 1000
    shared = block_work_bytes(gptq, block(1000, ("q_proj", "k_proj", "v_proj")))
    assert shared == small  # k and v read q's input: no Hessian of their own, and no wider W


def test_budget_runs_predict_their_passes_through_the_head():
    """The head term of a budget run grows with seq_len * vocabulary while one sample's positions fit in
    one lm_head chunk (the Fisher's backward: FISHER_HEAD_COPIES fp32 [L - 1, V]), and stops growing with
    seq_len past it (chunks of HEAD_CHUNK_BYTES); the loss passes never hold [BATCH, L, V]."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.calibration.backward import HEAD_CHUNK_BYTES
    from lowbit.compress.preflight import FISHER_HEAD_COPIES, head_pass_bytes

    def net(vocab: int):
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
        with torch.device("meta"):
            return LlamaForCausalLM(cfg)

    def with_len(recipe, L: int):
        return replace(recipe, calibration=replace(recipe.calibration, seq_len=L))

    awq = PRESETS["alloc-awq"]
    assert awq.allocate.metric == "fisher" and awq.allocate.check
    fisher = replace(awq, allocate=replace(awq.allocate, probes=0, check=False))
    losses = replace(awq, allocate=replace(awq.allocate, metric="output"))
    small, big, real = net(20_000), net(40_000), net(151_936)  # real: 110 positions per chunk
    for L in (33, 65):  # [L - 1, V] fp32 below one chunk
        got = head_pass_bytes(with_len(fisher, L), big, torch.bfloat16)
        got -= head_pass_bytes(with_len(fisher, L), small, torch.bfloat16)
        assert got == FISHER_HEAD_COPIES * 4 * (L - 1) * 20_000
    long, longer = (head_pass_bytes(with_len(fisher, L), real, torch.bfloat16) for L in (512, 2048))
    assert long == longer <= FISHER_HEAD_COPIES * HEAD_CHUNK_BYTES
    got = head_pass_bytes(with_len(losses, 512), real, torch.bfloat16)
    assert 2 * HEAD_CHUNK_BYTES < got < 4 * HEAD_CHUNK_BYTES  # one chunk, not 4 x 511 x V x 4 bytes
    neither = replace(losses, allocate=replace(losses.allocate, probes=0, check=False))
    assert head_pass_bytes(neither, real, torch.bfloat16) == 0
