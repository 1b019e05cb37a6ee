"""`lowbit compress --nproc N` runs the same command under torchrun; the processes write one checkpoint."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lowbit import cli


def test_nproc_relaunches_the_same_command_under_torchrun(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: seen.append(cmd) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["compress", "--model", "m", "--out", str(tmp_path / "o"), "--nproc", "3"]
    assert cli.main(argv) == 0
    (cmd,) = seen
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc-per-node=3" in cmd
    assert cmd[-len(argv) :] == ["-m", "lowbit.cli", *argv[:-2]]


@pytest.mark.slow
def test_nproc_two_writes_what_one_process_writes(tiny_llama_dir, tmp_path):
    base = ["--model", str(tiny_llama_dir)]
    recipe = ["--recipe", str(tmp_path / "r.json")]
    (tmp_path / "r.json").write_text('{"quantize": {"format": "int4", "group_size": 32}}')
    for n in (1, 2):
        argv = ["compress", *base, *recipe, "--out", str(tmp_path / f"n{n}"), "--nproc", str(n)]
        run = subprocess.run([sys.executable, "-m", "lowbit.cli", *argv], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.count("wrote") <= 1  # rank 0 speaks for the job
    one, two = (load_file(tmp_path / f"n{n}" / "model.safetensors") for n in (1, 2))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
