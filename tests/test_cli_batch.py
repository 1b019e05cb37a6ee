"""The CLI for batch jobs: version, device and dtype, calibration overrides, logging, locks, resumable
budgets, and every argument checked before the model is loaded (one line, nothing written)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import lowbit
from lowbit.cli import main
from lowbit.compress import api
from lowbit.nn.manifest import read_manifest


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if a model is loaded: every refusal must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(api, "load_model", refuse)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lowbit {lowbit.__version__}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "tpu"], "device must be cpu, cuda or cuda:N"),
        (["--preset", "int4-g128", "--data", "builtin:lee-news"], "--data is not used: --preset int4-g128"),
        (["--preset", "int4-g128", "--samples", "8"], "--samples is not used"),
        (["--preset", "int3-g128-gptq", "--data", "missing.txt"], "text file 'missing.txt' does not exist"),
        (["--preset", "alloc-int", "--budgets", "3,3"], "budgets repeat"),
        (["--preset", "alloc-int", "--budgets", "3,nan"], "a budget must be a number of bits per weight"),
        (["--preset", "alloc-int", "--budget", "0"], "budget must be a positive number"),
        (["--no-baselines"], "--no-baselines needs --eval or several --budgets"),
        (["--model", "./tiny-lama"], "model path './tiny-lama' does not exist"),
        (["--model", "smollm2-135"], "did you mean the built-in 'smollm2-135m'"),
        (["--log-file", "no/such/dir/log.txt"], "--log-file no/such/dir/log.txt: its folder does not exist"),
    ],
)
def test_bad_arguments_are_refused_before_loading(
    capsys, tiny_llama_dir, tmp_path, monkeypatch, no_load, argv, message
):
    if "--model" not in argv:
        argv = [*argv, "--model", tiny_llama_dir]
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "compress", *argv, "--out", tmp_path / "out")
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_typo_in_a_folder_path_is_answered_at_once(capsys, tiny_llama_dir, tmp_path, monkeypatch, no_load):
    code, _, err = run(capsys, "compress", "--model", f"{tiny_llama_dir}x/sub", "--out", tmp_path / "o")
    assert code == 2 and "does not exist" in err
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "compress", "--model", "models/tiny", "--out", tmp_path / "o")
    assert code == 2 and "model path 'models/tiny' does not exist" in err


def test_eval_refuses_a_missing_device(capsys, tiny_llama_dir):
    code, _, err = run(capsys, "eval", tiny_llama_dir, "--device", "cuda:7")
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert code == 2 and err.count("\n") == 1 and "device cuda:7" in err


def test_dtype_samples_seq_len_and_logging(capsys, tiny_llama_dir, news_file, tmp_path):
    out, log = tmp_path / "ck", tmp_path / "job.log"
    code, _, err = run(
        capsys,
        "compress",
        "--model",
        tiny_llama_dir,
        "--preset",
        "int4-g128-gptq",
        "--data",
        news_file,
        "--samples",
        4,
        "--seq-len",
        24,
        "--dtype",
        "bfloat16",
        "--device",
        "cpu",
        "--out",
        out,
        "-v",
        "--log-file",
        log,
        "--json",
    )
    assert code == 0, err
    calibration = read_manifest(out)["recipe"]["calibration"]
    assert (calibration["samples"], calibration["seq_len"], calibration["data"]) == (4, 24, str(news_file))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert "lowbit.compress.api: compressed in" in err  # -v shows the log on stderr
    text = log.read_text()
    assert "model loaded in" in text and "compressed in" in text
    code, stdout, _ = run(capsys, "eval", out, "--data", news_file, "--device", "cpu", "--dtype", "float32")
    assert code == 0 and "perplexity" in stdout


def test_budgets_resume_with_the_same_command(capsys, tiny_llama_dir, news_file, tmp_path):
    out = tmp_path / "pareto"
    argv = ["compress", "--model", tiny_llama_dir, "--preset", "alloc-int", "--budgets", "3,3.5"]
    argv += ["--data", news_file, "--samples", 4, "--seq-len", 24, "--eval-tokens", 64]
    argv += ["--no-baselines", "--out", out, "--json"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert [p["kind"] for p in json.loads(stdout)["points"]] == ["original", "budget", "budget"]
    first = (out / "bpw-3" / "model.safetensors").stat().st_mtime_ns
    shutil.rmtree(out / "bpw-3.5")  # as if killed before the second budget was written
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert (out / "bpw-3" / "model.safetensors").stat().st_mtime_ns == first  # kept, not rewritten
    assert [b["out"] for b in json.loads(stdout)["budgets"]] == [str(out / "bpw-3"), str(out / "bpw-3.5")]
    lowbit.load(out / "bpw-3.5")
    argv[argv.index(4)] = 8  # another recipe: the written budgets are not silently replaced
    code, _, err = run(capsys, *argv)
    assert code == 2 and "bpw-3 exists; pass --overwrite" in err


def test_two_jobs_on_one_out_are_refused_and_a_dead_jobs_lock_is_taken_over(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "ck"
    lock = tmp_path / ".ck.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{sleeper.pid}\n")
        code, _, err = run(capsys, "compress", "--model", tiny_llama_dir, "--out", out)
        assert code == 2 and f"is in use by another lowbit job (pid {sleeper.pid})" in err
        assert not out.exists() and lock.read_text() == f"{sleeper.pid}\n"
    finally:
        sleeper.kill()
        sleeper.wait()
    code, _, err = run(capsys, "compress", "--model", tiny_llama_dir, "--out", out, "--json")
    assert code == 0, err
    assert (out / "lowbit_config.json").is_file() and not lock.exists()


def test_python_api_keywords(tiny_llama_dir, news_file, tmp_path):
    model, report = lowbit.compress(
        str(tiny_llama_dir),
        "int4-g128-gptq",
        data=str(news_file),
        samples=3,
        seq_len=16,
        device="cpu",
        out=tmp_path / "ck",
        progress=False,
    )
    assert report.recipe["calibration"]["samples"] == 3 and (tmp_path / "ck" / "README.md").is_file()
    assert str(tiny_llama_dir) in (tmp_path / "ck" / "README.md").read_text()
    blocks = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    _, report = lowbit.compress(str(tiny_llama_dir), "int4-g128-gptq", data=blocks, progress=False)
    assert report.recipe["calibration"]["data"].startswith("tokens:")
    with pytest.raises(ValueError, match="reads no calibration data"):
        lowbit.compress(str(tiny_llama_dir), "int4-g128", data=blocks, progress=False)


def test_a_running_jobs_work_area_is_locked_even_against_restart(tmp_path):
    from lowbit.compress.budget import work_area
    from lowbit.compress.presets import preset
    from lowbit.nn.atomic import LockedError

    recipe = preset("alloc-int")
    with work_area("some-model", recipe, tmp_path / "a", None, False) as area:
        (area.dir / "calibration.safetensors").write_bytes(b"kept")
        lock = area.dir.parent / f".{area.dir.name}.lock"
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(LockedError, match="in use by another lowbit job"):
            with work_area("some-model", recipe, tmp_path / "b", None, True):
                pass
        assert (area.dir / "calibration.safetensors").read_bytes() == b"kept"
    assert not lock.exists()
