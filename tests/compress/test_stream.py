"""A safetensors folder is compressed block by block: at most one block in memory, the result equal bit for
bit to the in-memory path's, sharded output, and a job killed mid-run resumes to the same checkpoint."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lowbit.compress import api
from lowbit.compress.blocks import StreamedFolder
from lowbit.compress.presets import preset
from lowbit.compress.recipe import DecomposeConfig
from lowbit.compress.stream import KILL_AFTER
from lowbit.models import load_model
from lowbit.nn.checkpoint import load
from lowbit.nn.shards import INDEX, read_headers

BLOCKS = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(0))
ROOT = Path(__file__).resolve().parents[2]
LQLORA = replace(preset("int3-g128-lqlora-r32"), decompose=DecomposeConfig("lqlora", rank=8, iterations=3))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for name, (f, _) in read_headers(folder).items():
        with safe_open(str(f), framework="pt") as g:
            out[name] = g.get_tensor(name)
    return out


def assert_same(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    ma, mb = (json.loads((f / "lowbit_config.json").read_text()) for f in (a, b))
    assert ma["layers"] == mb["layers"] and ma["recipe"] == mb["recipe"]


def in_memory(source: Path, recipe, out: Path, dtype=None):
    model, tok = load_model(str(source), dtype)
    data = BLOCKS if recipe == "int4-g128-gptq" else None
    _, report = api.compress(model, recipe, out, tokenizer=tok, data=data, progress=False)
    return out, report


@pytest.mark.parametrize(
    "recipe, dtype",
    [
        ("int4-g128", None),
        ("int4-g128", torch.float32),
        ("int4-g128-gptq", None),
        ("int3-g128-lqlora-r32", None),
    ],
)
def test_streamed_equals_in_memory_with_one_block_at_a_time(source, tmp_path, monkeypatch, recipe, dtype):
    opened = []

    class Spy(StreamedFolder):
        def __init__(self, *args):
            super().__init__(*args)
            opened.append(self)

    monkeypatch.setattr(api, "StreamedFolder", Spy)
    data = BLOCKS if recipe == "int4-g128-gptq" else None
    model, report = api.compress(str(source), recipe, tmp_path / "s", data=data, dtype=dtype, progress=False)
    (provider,) = opened
    assert provider.most_live == 1 and not provider.live  # one block at a time, all released
    assert provider.dtype == (dtype or torch.bfloat16)  # the source's dtype unless overridden
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    ref, ref_report = in_memory(source, recipe, tmp_path / "m", dtype)
    assert_same(tmp_path / "s", ref)
    assert not (tmp_path / ".lowbit-work").exists()  # removed after success
    assert report.bits_per_weight == ref_report.bits_per_weight and report.layers == ref_report.layers


def test_sharded_streamed_output_loads_with_identical_logits(source, tmp_path):
    api.compress(str(source), "int4-g128", tmp_path / "s", max_shard_size=30_000, progress=False)
    shards = sorted(p.name for p in (tmp_path / "s").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "s" / INDEX).is_file()
    assert not (tmp_path / "s" / "model.safetensors").exists()
    ref, _ = in_memory(source, "int4-g128", tmp_path / "m")
    assert_same(tmp_path / "s", ref)
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(3))
    assert torch.equal(load(tmp_path / "s")(ids).logits, load(ref)(ids).logits)


def run_killed(source: Path, out: Path, block: int, shard: int) -> subprocess.CompletedProcess:
    code = (
        "import sys, torch; from lowbit.compress.api import compress; "
        "data = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(0)); "
        f"compress(sys.argv[1], 'int4-g128-gptq', sys.argv[2], data=data, max_shard_size={shard}, "
        "progress=False)"
    )
    env = {**os.environ, KILL_AFTER: str(block), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, str(source), str(out)], env=env, capture_output=True)


@pytest.mark.parametrize("block, shard", [(0, 10**9), (2, 10_000)])
def test_a_killed_gptq_job_resumes_bit_identically(source, tmp_path, block, shard):
    proc = run_killed(source, tmp_path / "s", block, shard)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (tmp_path / "s").exists()  # nothing half-written
    (work,) = [p for p in (tmp_path / ".lowbit-work").iterdir() if p.is_dir()]
    parts = sorted(p.stem for p in (work / "parts").glob("*.safetensors"))
    shards = list((work / "shards").glob("*.safetensors"))
    assert parts[-1] == f"block-{block:05d}" and list(work.glob("hidden-*.safetensors"))
    assert bool(shards) == (block > 0)  # with small shards the first blocks were packed before the kill
    api.compress(
        str(source), "int4-g128-gptq", tmp_path / "s", data=BLOCKS, max_shard_size=shard, progress=False
    )
    assert_same(tmp_path / "s", in_memory(source, "int4-g128-gptq", tmp_path / "m")[0])
    assert not (tmp_path / ".lowbit-work").exists()


def test_dry_run_predicts_the_streamed_path(source):
    from lowbit.compress import dry_run

    streamed, whole = dry_run(str(source), "int4-g128"), dry_run(load_model(str(source))[0], "int4-g128")
    assert streamed.streamed and not whole.streamed
    assert streamed.peak_ram_bytes < whole.peak_ram_bytes  # one block, not the model, is in memory
    assert streamed.work_bytes >= streamed.output_bytes[0]  # the shards wait in the work area
    assert dry_run(str(source), "alloc-int", budget=4.0).streamed  # the budget path streams too
    assert dry_run(str(source), "alloc-awq", budget=4.0).streamed  # probes and the check too


def test_hidden_states_on_disk_give_the_same_checkpoint(source, tmp_path, monkeypatch, capsys):
    from lowbit import cli
    from lowbit.calibration import hidden

    written = []
    monkeypatch.setattr(hidden.HiddenStates, "_write", spy_write(hidden.HiddenStates._write, written))
    gptq = preset("int4-g128-gptq")
    on_disk = replace(gptq, calibration=replace(gptq.calibration, max_hidden_memory=0))
    api.compress(str(source), on_disk, tmp_path / "s", data=BLOCKS, progress=False)
    assert written and all(f.is_relative_to(tmp_path / ".lowbit-work") for f in written)  # the work area
    ref, _ = in_memory(source, "int4-g128-gptq", tmp_path / "m")
    ta, tb = tensors(tmp_path / "s"), tensors(ref)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # the dry run predicts less memory and more work-area disk past the limit (128 samples of 512 tokens)
    argv = ["compress", "--model", str(source), "--preset", "int4-g128-gptq", "--out", str(tmp_path / "d")]
    argv += ["--dry-run", "--json"]
    assert cli.main(argv) == 0
    plain = json.loads(capsys.readouterr().out)["dry_run"]
    assert cli.main([*argv, "--max-hidden-memory", "1MB"]) == 0
    limited = json.loads(capsys.readouterr().out)["dry_run"]
    hidden_bytes = 128 * 512 * 64 * 2  # [S, L, D] in bf16
    assert plain["peak_ram_bytes"] - limited["peak_ram_bytes"] > hidden_bytes
    assert limited["work_bytes"] - plain["work_bytes"] > hidden_bytes // 2


def spy_write(write, written: list):
    def spy(self, j, t):
        write(self, j, t)
        written.append(self._path(j))

    return spy
