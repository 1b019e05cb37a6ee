"""The GPU scripts' dry runs: they check their plan and imports on a machine without a GPU."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def load(script: str):
    spec = importlib.util.spec_from_file_location(script, ROOT / "scripts" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "script, args",
    [("gpu_check", ["--shapes", "4096x4096"]), ("bench_decode", ["--graph", "--model", "llama-3.2-1b"])],
)
def test_dry_run_checks_the_plan_without_a_gpu(script, args, capsys):
    pytest.importorskip("triton")
    cmd = [sys.executable, f"scripts/{script}.py", "--dry-run", *args]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "dry run: no GPU work done" in ok.stdout, ok.stderr[-2000:]
    bad = ["--rows" if script == "gpu_check" else "--batch", "0"]
    assert load(script).main(["--dry-run", *bad]) == 1
    assert capsys.readouterr().err.count("\n") == 1  # one short line
