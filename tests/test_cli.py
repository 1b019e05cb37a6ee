"""The CLI end to end on a tiny random Llama with a real tokenizer, and its bad-input errors."""

import json
import math

import pytest
import torch

from lowbit.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def compressed(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "int4"
    code = main(
        [
            "compress",
            "--model",
            str(tiny_llama_dir),
            "--preset",
            "int4-g128",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert code == 0
    return out


def test_compress_eval_info_end_to_end(capsys, tiny_llama_dir, news_file, tmp_path):
    out = tmp_path / "nf4"
    code, stdout, _ = run(
        capsys,
        "compress",
        "--model",
        tiny_llama_dir,
        "--preset",
        "nf4-g64",
        "--data",
        news_file,
        "--out",
        out,
        "--eval",
        "--json",
    )
    assert code == 0
    r = json.loads(stdout)
    assert (out / "lowbit_config.json").is_file() and (out / "model.safetensors").is_file()
    assert 4.0 < r["bits_per_weight"] < 5.0  # 4-bit codes + one fp16 scale per 64 weights
    assert r["original"]["tokens"] == r["compressed"]["tokens"] > 0
    assert math.isfinite(r["compressed"]["perplexity"])
    # a random model's perplexity moves, but a 4-bit copy stays close to the original
    assert abs(math.log(r["compressed"]["perplexity"] / r["original"]["perplexity"])) < 0.2

    code, stdout, _ = run(capsys, "eval", out, "--data", news_file, "--json")
    assert code == 0
    e = json.loads(stdout)
    assert set(e) >= {"perplexity", "tokens", "bits_per_weight"}
    assert e["perplexity"] == pytest.approx(r["compressed"]["perplexity"], rel=1e-5)

    code, stdout, _ = run(capsys, "info", out, "--json")
    assert code == 0
    info = json.loads(stdout)
    assert len(info["layers"]) == 2 * 7  # q, k, v, o, gate, up, down per block; lm_head excluded
    assert info["totals"]["bits_per_weight"] == pytest.approx(r["bits_per_weight"])


def test_text_output_and_loaded_model_matches(capsys, compressed, news_file):
    import lowbit
    from lowbit.nn.qlinear import QLinear

    code, stdout, _ = run(capsys, "info", compressed)
    assert code == 0 and "int4-g128" in stdout and "bits per weight" in stdout
    model = lowbit.load(compressed)
    assert sum(isinstance(m, QLinear) for m in model.modules()) == 14
    assert not isinstance(model.lm_head, QLinear)
    ids = torch.arange(1, 17)[None]
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "int5-g128"], "unknown preset"),
        (["--recipe", "missing.yaml"], "recipe file not found"),
        (["--model", "/nonexistent/model"], "/nonexistent/model"),
    ],
)
def test_compress_bad_input(capsys, tiny_llama_dir, tmp_path, argv, message):
    argv = [a.replace("missing.yaml", str(tmp_path / "missing.yaml")) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(tiny_llama_dir)]
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", *argv, "--out", out)
    assert code != 0
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_group_size_not_multiple_of_8(capsys, tiny_llama_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quantize: {format: int4, group_size: 100}\n")
    code, _, err = run(
        capsys, "compress", "--model", tiny_llama_dir, "--recipe", recipe, "--out", tmp_path / "o"
    )
    assert code == 2 and "multiple of 8" in err
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(capsys, tiny_llama_dir, compressed, tmp_path):
    before = sorted(p.name for p in compressed.iterdir())
    code, _, err = run(capsys, "compress", "--model", tiny_llama_dir, "--out", compressed)
    assert code == 2 and "exists" in err and "--overwrite" in err
    assert sorted(p.name for p in compressed.iterdir()) == before


def test_nan_weight_is_refused(capsys, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    bad = tmp_path / "nan-model"
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(bad)
    code, _, err = run(capsys, "compress", "--model", bad, "--out", tmp_path / "o")
    assert code == 2 and "model.layers.1.mlp.up_proj" in err and "NaN" in err
    assert not (tmp_path / "o").exists()


def test_eval_and_info_bad_checkpoints(capsys, compressed, tmp_path):
    code, _, err = run(capsys, "info", tmp_path / "nothing-here")
    assert code == 2 and "nothing-here" in err
    code, _, err = run(capsys, "eval", compressed, "--data", "no-such-file.jsonl")
    assert code == 2 and "no-such-file.jsonl" in err


def test_help_on_every_command(capsys):
    for cmd in ([], ["compress"], ["eval"], ["info"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        assert "usage: lowbit" in capsys.readouterr().out


def corrupt_copy(src, dst, how: str):
    import shutil

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "missing":
        weights.unlink()
    elif how == "tampered":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif how == "newer":
        manifest = json.loads((dst / "lowbit_config.json").read_text())
        manifest["format_version"] += 1
        (dst / "lowbit_config.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize(
    "how, message",
    [("truncated", "truncated"), ("missing", "missing"), ("tampered", "sha256"), ("newer", "newer")],
)
def test_eval_and_info_refuse_broken_checkpoints(capsys, compressed, tmp_path, how, message):
    broken = corrupt_copy(compressed, tmp_path / how, how)
    code, _, err = run(capsys, "eval", broken)
    assert code == 2 and message in err.lower() and err.count("\n") == 1
    if how != "tampered":  # info reads the manifest and headers, not every byte
        code, _, err = run(capsys, "info", broken)
        assert code == 2 and message in err.lower()


def test_eval_reads_a_compressed_tensors_export_with_its_adapter(capsys, tiny_llama_dir, news_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "quantize: {format: int4, group_size: 32, symmetric: true}\ndecompose: {method: lorc, rank: 4}\n"
    )
    ck, ct = tmp_path / "ck", tmp_path / "ct"
    assert (
        run(capsys, "compress", "--model", tiny_llama_dir, "--recipe", recipe, "--out", ck, "--json")[0] == 0
    )
    code, _, err = run(capsys, "export", ck, "--to", "compressed-tensors", "--out", ct, "--json")
    assert code == 0, err
    assert (ct / "adapter" / "adapter_config.json").is_file()
    ppl = {}
    for target in (ck, ct):
        code, stdout, _ = run(capsys, "eval", target, "--data", news_file, "--json")
        assert code == 0
        ppl[target] = json.loads(stdout)["perplexity"]
    assert ppl[ct] == pytest.approx(ppl[ck], rel=1e-4)


def test_dry_run_reads_no_weight_and_prints_the_plan(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "never-written"
    argv = ["compress", "--model", str(tiny_llama_dir), "--preset", "int4-g128", "--out", str(out)]
    assert main([*argv, "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["dry_run"]
    assert plan["quantized_params"] > 0 and all(b > 0 for b in plan["output_bytes"])
    assert not out.exists()
    infeasible = ["compress", "--model", str(tiny_llama_dir), "--preset", "alloc-int", "--budget", "0.5"]
    assert main([*infeasible, "--out", str(out), "--dry-run"]) == 2  # refused before any weight is read
    assert "budget" in capsys.readouterr().err


def test_dry_run_plans_the_calibration_the_job_would_run(tiny_llama_dir, tmp_path, capsys):
    """--samples and --seq-len reach the dry run: the plan is the API's for the recipe with them."""
    from dataclasses import replace

    from lowbit.compress import dry_run
    from lowbit.compress.presets import preset

    argv = ["compress", "--model", str(tiny_llama_dir), "--preset", "int4-g128-gptq", "--out", str(tmp_path)]
    assert main([*argv, "--samples", "3", "--seq-len", "4096", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["dry_run"]
    recipe = preset("int4-g128-gptq")
    given = replace(recipe, calibration=replace(recipe.calibration, samples=3, seq_len=4096))
    want, default = (dry_run(str(tiny_llama_dir), r).peak_ram_bytes for r in (given, recipe))
    assert plan["peak_ram_bytes"] == want != default


def test_dry_run_plans_the_dtype_the_job_would_load(tiny_llama_dir, tmp_path, capsys):
    """--dtype reaches the dry run: the unquantized tensors are written in it (the test model is fp32)."""
    argv = ["compress", "--model", str(tiny_llama_dir), "--preset", "int4-g128", "--out", str(tmp_path)]
    plans = {}
    for dtype in ("float32", "bfloat16"):
        assert main([*argv, "--dtype", dtype, "--dry-run", "--json"]) == 0
        plans[dtype] = json.loads(capsys.readouterr().out)["dry_run"]
    assert plans["bfloat16"]["dtype"] == "bfloat16" and plans["float32"]["dtype"] == "float32"
    assert plans["bfloat16"]["output_bytes"][0] < plans["float32"]["output_bytes"][0]
