"""Checkpoints made for a serving engine (`lowbit compress --target`) export with every layer as allocated.

A budget checkpoint made with --target vllm exports to compressed-tensors with no layer converted and
the same stored bits, loads in plain transformers (a process that never imports lowbit) and computes
lowbit.load's logits exactly (float32); made with --target llama.cpp it exports to GGUF with each
tensor's llama.cpp type the one its allocated spec maps to. Tiny random Llama (hidden 64, MLP 160).
"""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lowbit.cli import main
from lowbit.compress.plan import uniform_choice
from lowbit.compress.presets import PRESETS, preset
from lowbit.compress.recipe import Recipe, RecipeError
from lowbit.export import export
from lowbit.nn.checkpoint import load
from lowbit.nn.manifest import read_manifest
from lowbit.quantizers import QuantSpec
from lowbit.quantizers.engines import ENGINES, fused_groups, llama_cpp_problem, served_group, vllm_problem
from tests.conftest import logits, make_tiny_llama

pytest.importorskip("compressed_tensors")
gguf = pytest.importorskip("gguf")

# A grid with widths vLLM / llama.cpp do not serve (2, 3) beside those they do (4, 8); Frobenius errors
# need no calibration, so the job is quick.
GRID = {
    "formats": ["int"],
    "bits": [2, 3, 4, 8],
    "group_sizes": [32, 64],
    "ranks": [0],
    "metric": "frobenius",
}
RECIPE = {"quantize": {"format": "int4", "group_size": 32, "symmetric": True}, "allocate": GRID}
PLAIN_TRANSFORMERS = """
import sys, torch, transformers
from safetensors.torch import save_file
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.arange(24).view(2, 12) % model.config.vocab_size
with torch.no_grad():
    save_file({"logits": model(ids).logits.float().contiguous()}, sys.argv[2])
print("lowbit" in sys.modules)
"""


def test_engine_rules():
    assert vllm_problem(QuantSpec("int4", 128), 576) and not vllm_problem(QuantSpec("int4", 64), 576)
    assert vllm_problem(QuantSpec("int8", 64), 64) and not vllm_problem(QuantSpec("int8", 64, True), 64)
    assert vllm_problem(QuantSpec("nf4", 64), None) and vllm_problem(QuantSpec("int3", 64), None)
    assert not llama_cpp_problem(QuantSpec("int4", 128), 576)  # a shorter last group of 64: 2 blocks
    assert llama_cpp_problem(QuantSpec("int4", 48), 576) and llama_cpp_problem(QuantSpec("int4", 32), 100)
    assert served_group("vllm", QuantSpec("int4", 128, True), 576) == QuantSpec("int4", 64, True)
    assert served_group("vllm", QuantSpec("int4", 128, True), 1536) == QuantSpec("int4", 128, True)
    assert served_group("vllm", QuantSpec("int4", 128), 160).group_size == 32
    assert served_group("lowbit", QuantSpec("int4", 128), 576).group_size == 128
    names = [
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    groups = fused_groups(names)
    assert len(groups) == 4 and groups[0] == names[:3] and groups[1] == names[4:6]
    assert not ENGINES["llama.cpp"].fused and ENGINES["vllm"].fused


def test_recipe_target_is_checked_and_recorded():
    r = Recipe.from_dict({"target": "vllm", **RECIPE})
    assert r.target == "vllm" and Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(RecipeError, match="unknown target"):
        Recipe.from_dict({"target": "tgi"})
    with pytest.raises(RecipeError, match="nf4"):
        Recipe.from_dict({"target": "vllm", "quantize": {"format": "nf4", "group_size": 64}})
    with pytest.raises(RecipeError, match="serves none of the candidates"):
        Recipe.from_dict({"target": "llama.cpp", "allocate": {**GRID, "bits": [2, 3], "budget": 3}})
    assert preset("int4-g128").quantize.symmetric and PRESETS["int4-g128-gptq"].quantize.symmetric
    choice = uniform_choice(
        Recipe.from_dict({"target": "vllm", **RECIPE}), "model.layers.0.mlp.down_proj", 160
    )
    assert choice.spec.group_size == 32


def _compress(tiny_llama_dir, tmp_path, target: str, budget: str) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / f"b-{target}"
    argv = ["compress", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--budget", budget]
    assert main([*argv, "--target", target, "--out", str(out), "--json"]) == 0
    return out


def _plan(out: Path) -> dict[str, QuantSpec]:
    layers = read_manifest(out)["layers"]
    return {n: QuantSpec.from_dict(e["spec"]) for n, e in layers.items()}


def test_vllm_budget_checkpoint_exports_as_allocated_and_loads_in_plain_transformers(
    tiny_llama_dir, tmp_path, capsys
):
    out = _compress(tiny_llama_dir, tmp_path, "vllm", "5.0")
    assert read_manifest(out)["recipe"]["target"] == "vllm"
    plan = _plan(out)
    assert all(vllm_problem(spec, 160 if n.endswith("down_proj") else 64) is None for n, spec in plan.items())
    assert {s.bits for s in plan.values()} == {4, 8}  # mixed precision, 2 / 3 bits never chosen
    for group in fused_groups(plan):
        assert len({plan[n] for n in group}) == 1, group
    ct = tmp_path / "ct"
    report = export(out, ct, "compressed-tensors", dtype="float32")
    assert report["converted"] == 0 and all(e["rel_error"] == 0.0 for e in report["layers"].values())
    assert all(e["target"] == e["source"] for e in report["layers"].values())  # no layer raised in bits
    ref, state = load(out), load_file(ct / "model.safetensors")
    weights = {n: m.in_features * m.out_features for n, m in ref.named_modules() if n in plan}
    code_bits = sum(state[f"{n}.weight_packed"].numel() * 32 for n in plan)
    assert code_bits == sum(plan[n].bits * w for n, w in weights.items())  # each layer's codes as allocated
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) >= 2  # one config group per scheme
    res = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(ct), str(tmp_path / "logits.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("False")  # lowbit was never imported
    ids = torch.arange(24).view(2, 12) % ref.config.vocab_size
    assert torch.equal(load_file(tmp_path / "logits.safetensors")["logits"], logits(ref, ids))


def test_llama_cpp_budget_checkpoint_exports_per_tensor_types_as_allocated(tmp_path):
    from lowbit.export.gguf import GGUF_TYPES, tensor_names
    from tests.export.test_gguf_export import byte_tokenizer

    source, tok = tmp_path / "source", byte_tokenizer()  # every byte a token, as llama.cpp needs
    make_tiny_llama(len(tok)).save_pretrained(source)
    tok.save_pretrained(source)
    out = _compress(source, tmp_path, "llama.cpp", "5.0")
    plan = _plan(out)
    assert all(llama_cpp_problem(spec, 64) is None for spec in plan.values())
    assert {s.bits for s in plan.values()} == {4, 8}
    g = tmp_path / "gguf"
    report = export(out, g, "gguf")
    assert report["converted"] == 0
    names = tensor_names(load(out).config)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(g / "model.gguf").tensors}
    for n, spec in plan.items():
        gname = names.get_name(f"{n}.weight", try_suffixes=(".weight",))
        assert types[gname] == GGUF_TYPES[(spec.format, spec.symmetric)], n


def test_dry_run_sees_the_target(tiny_llama_dir):
    """The plan of a --target job: vLLM's group fallback in the sizes, its candidates in the budget check."""
    from lowbit.compress import dry_run
    from lowbit.compress.allocate import AllocationError

    lowbit_plan = dry_run(str(tiny_llama_dir), preset("int4-g128"))
    vllm_plan = dry_run(str(tiny_llama_dir), replace(preset("int4-g128"), target="vllm"))
    assert vllm_plan.bits_per_weight[0] > lowbit_plan.bits_per_weight[0]  # down_proj: g128 -> g32 on K 160
    with pytest.raises(AllocationError, match="infeasible"):  # 2 and 3 bits are not served by vLLM
        dry_run(str(tiny_llama_dir), Recipe.from_dict({"target": "vllm", **RECIPE}), budgets=[3.5])
    dry_run(str(tiny_llama_dir), Recipe.from_dict(RECIPE), budgets=[3.5])


def test_gguf_export_keeps_the_checkpoint_s_dtype(tmp_path):
    """A bfloat16 source gives a bfloat16 checkpoint, whose GGUF export writes its unquantized tensors in
    BF16 by default (float32 only when the checkpoint is float32 or --dtype asks for it): the token
    embedding when asked for as a float type (by default it is Q8_0, as llama-quantize writes it)."""
    from tests.export.test_gguf_export import byte_tokenizer

    source, tok = tmp_path / "source", byte_tokenizer()
    make_tiny_llama(len(tok)).to(torch.bfloat16).save_pretrained(source)
    tok.save_pretrained(source)
    assert main(["compress", "--model", str(source), "--out", str(tmp_path / "int4"), "--json"]) == 0
    for embedding, want in ((None, "Q8_0"), ("bf16", "BF16")):
        out = tmp_path / f"gguf-{embedding}"
        report = export(tmp_path / "int4", out, "gguf", embedding=embedding)
        assert report["dtype"] == "bfloat16"
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
        assert types["token_embd.weight"] == want


def test_uniform_recipe_splitting_a_fused_group_is_refused_for_vllm(tiny_llama_dir):
    from lowbit.compress.api import compress

    int8_k = [{"match": "*.k_proj", "quantize": {"format": "int8", "symmetric": True}}]
    for split in ({"overrides": int8_k}, {"exclude": ["lm_head", "*.up_proj"]}):
        with pytest.raises(RecipeError, match="one matrix"):
            compress(str(tiny_llama_dir), Recipe.from_dict({"target": "vllm", **split}), progress=False)
