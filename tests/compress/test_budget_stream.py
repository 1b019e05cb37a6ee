"""The budget path block by block: one block's statistics alive at a time, a safetensors folder streamed
with one block in memory, the result equal bit for bit to the model-in-memory run (probes, penalties,
the check and rotations included), resumable after a kill."""

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.calibration import LayerStats
from lowbit.compress import api, budget_passes
from lowbit.compress.blocks import StreamedFolder
from lowbit.compress.recipe import Recipe
from lowbit.compress.stream import KILL_AFTER
from lowbit.models import load_model
from tests.compress.test_stream import BLOCKS, assert_same

ROOT = Path(__file__).resolve().parents[2]
GRID = {
    "formats": ["int"],
    "bits": [2, 3, 4],
    "group_sizes": [32, 64],
    "ranks": [0, 4],
    "rounding": "nearest",
}
# the Fisher metric (block-wise backward), GPTQ rounding of the chosen candidates (second pass)
ALLOC = {
    "quantize": {"rounding": "gptq"},
    "allocate": GRID,
    "decompose": {"method": "lorc"},
    "calibration": {"samples": 4, "seq_len": 24},
}
# AWQ scales searched per block and replayed when the block is read again; the output metric
AWQ = {
    "quantize": {"format": "int3", "group_size": 32, "rounding": "gptq"},
    "scaling": {"method": "awq", "objective": "layers", "grid": 5, "clip": False},
    "allocate": {**GRID, "metric": "output"},
    "calibration": {"samples": 4, "seq_len": 24},
}
# alloc-awq's shape: AWQ scales, probes and the check, LoRC candidates, GPTQ rounding
PROBES_CHECK = {
    "quantize": {"format": "int3", "group_size": 32, "rounding": "gptq"},
    "scaling": {"method": "awq", "objective": "layers", "grid": 5, "clip": False},
    "allocate": {**GRID, "probes": 2, "check": True},
    "decompose": {"method": "lorc"},
    "calibration": {"samples": 4, "seq_len": 24},
}
# a rotated recipe with the penalty search and the check
ROTATE_PENALTIES = {
    "quantize": {"format": "int3", "group_size": 32, "rounding": "gptq"},
    "rotate": {"method": "hadamard", "heads": True, "online_down": True},
    "allocate": {**GRID, "metric": "output", "penalties": [4.0], "check": True},
    "calibration": {"samples": 4, "seq_len": 24},
}
RECIPES = {"alloc": ALLOC, "awq": AWQ, "probes-check": PROBES_CHECK, "rotate-penalties": ROTATE_PENALTIES}


def in_memory(source: Path, recipe, out: Path, budgets):
    model, tok = load_model(str(source))
    return api.compress(model, recipe, out, tokenizer=tok, data=BLOCKS, budgets=budgets, progress=False)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_streamed_budgets_equal_in_memory_with_one_block_at_a_time(source, tmp_path, monkeypatch, name):
    opened, init = [], StreamedFolder.__init__
    monkeypatch.setattr(StreamedFolder, "__init__", lambda self, *a: (init(self, *a), opened.append(self))[0])
    recipe, budgets = Recipe.from_dict(RECIPES[name]), [2.75, 3.5]
    model, report = api.compress(
        str(source), recipe, tmp_path / "s", data=BLOCKS, budgets=budgets, progress=False
    )
    (provider,) = opened
    assert provider.most_live == 1 and not provider.live  # one block at a time, all released
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    _, ref = in_memory(source, recipe, tmp_path / "m", budgets)
    for b in budgets:
        assert_same(tmp_path / "s" / f"bpw-{b:g}", tmp_path / "m" / f"bpw-{b:g}")
    for got, want in zip(report.budgets, ref.budgets, strict=True):
        assert got["plan"] == want["plan"] and got["bits_per_weight"] == pytest.approx(
            want["bits_per_weight"]
        )
        assert got["losses"] == want["losses"] and got["fallback"] == want["fallback"]


def test_at_most_one_blocks_hessians_are_alive(source, tmp_path, monkeypatch):
    """Counted whenever a part of the table (one layer, one spec) or an allocated layer is computed: the
    Hessians alive are those of one block (q/k/v, o, gate/up and down read 4 distinct inputs), never the
    model's 12, and each is dropped from the statistics once its last reader has it (`hessians_in_turn`)."""
    alive = []

    def count(fn):
        def counted(*args, **kwargs):
            gc.collect()
            held = {
                id(o.hessian) for o in gc.get_objects() if type(o) is LayerStats and o.hessian is not None
            }
            alive.append(len(held))
            return fn(*args, **kwargs)

        return counted

    monkeypatch.setattr(budget_passes, "error_row", count(budget_passes.error_row))
    monkeypatch.setattr(budget_passes, "apply_choice", count(budget_passes.apply_choice))
    model, tok = load_model(str(source))
    recipe = Recipe.from_dict({**ALLOC, "allocate": {**GRID, "metric": "output"}})
    api.compress(model, recipe, tmp_path / "m", tokenizer=tok, data=BLOCKS, budget=3.0, progress=False)
    units = 7 * 6  # the table's: each of the 7 layers under each of the grid's 6 specs, costliest first
    table, built = alive[: 3 * units], alive[3 * units :]
    for b in range(3):
        calls = table[b * units : (b + 1) * units]
        assert calls[0] == 4 and calls[-1] == 0 and calls == sorted(calls, reverse=True)
    assert built == [4, 4, 3, 2, 2, 1, 0] * 3  # q k v o gate up down, 3 blocks


def run_killed(source: Path, out: Path, block: int) -> subprocess.CompletedProcess:
    code = (
        "import sys; from lowbit.compress.api import compress; from lowbit.compress.recipe import Recipe; "
        f"from tests.compress.test_stream import BLOCKS; recipe = Recipe.from_dict({ALLOC!r}); "
        "compress(sys.argv[1], recipe, sys.argv[2], data=BLOCKS, budget=3.0, max_shard_size=10_000, "
        "progress=False)"
    )
    env = {**os.environ, KILL_AFTER: str(block), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, str(source), str(out)], env=env, capture_output=True)


def test_a_killed_streamed_budget_job_resumes_bit_identically(source, tmp_path):
    proc = run_killed(source, tmp_path / "s", 1)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (tmp_path / "s").exists()  # nothing half-written
    (work,) = [p for p in (tmp_path / ".lowbit-work").iterdir() if p.is_dir()]
    assert (work / "error_table.safetensors").is_file()  # the table and blocks 0, 1 were done
    recipe = Recipe.from_dict(ALLOC)
    api.compress(
        str(source), recipe, tmp_path / "s", data=BLOCKS, budget=3.0, max_shard_size=10_000, progress=False
    )
    in_memory(source, recipe, tmp_path / "m", [3.0])
    assert_same(tmp_path / "s", tmp_path / "m")
