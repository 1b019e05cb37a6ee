"""Probes, the penalty search and the uniform check measured block by block from a safetensors folder
(lowbit.compress.losses.streamed_losses): the losses equal those of the model in memory bit for bit, one
block is materialised at a time, and the budget path with them streams to the in-memory run's checkpoint,
resuming after a kill."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from lowbit.compress import api, budget, budget_stream
from lowbit.compress.allocate import Candidate, ErrorTable, allocate, budget_bits
from lowbit.compress.blocks import StreamedFolder
from lowbit.compress.losses import Variant, in_memory_losses, streamed_losses
from lowbit.compress.probes import penalty_search, plan_variant, probe_factors
from lowbit.compress.recipe import Recipe
from lowbit.compress.stream import KILL_AFTER
from lowbit.compress.uniform import selected_names
from lowbit.models import load_model
from lowbit.models.source import open_folder
from lowbit.quantizers import QuantSpec
from tests.compress.test_budget_stream import GRID, PROBES_CHECK, in_memory
from tests.compress.test_stream import BLOCKS, assert_same

ROOT = Path(__file__).resolve().parents[2]
TOKENS = torch.randint(0, 250, (6, 24), generator=torch.Generator().manual_seed(0))  # micro-batches 4 + 2


def streamed(source: Path) -> StreamedFolder:
    skeleton, headers, dtype, _ = open_folder(str(source), None)
    return StreamedFolder(skeleton, headers, dtype, torch.device("cpu"))


def linears_of(model) -> dict:
    return {n: model.get_submodule(n) for n in selected_names(model, Recipe.from_dict(PROBES_CHECK))}


def made_up_table(linears: dict) -> ErrorTable:
    """Errors that fall with the bits, per layer; sizes as stored."""
    specs = [QuantSpec(f"int{b}", group_size=32) for b in (2, 3, 4)]
    cands = [Candidate(s) for s in specs]
    names, shapes = list(linears), [tuple(m.weight.shape) for m in linears.values()]
    errors = np.array([[4.0**-b * (1 + i % 3) for b in (2, 3, 4)] for i in range(len(names))])
    sizes = np.array([[n * k * b for b in (2, 3, 4)] for n, k in shapes])
    return ErrorTable(names, shapes, cands, errors, sizes)


def test_streamed_losses_equal_in_memory_bit_for_bit(source, tmp_path):
    """Probes (one block differs), plans (every block differs) and the float model, from a bf16 folder
    with every hidden state on disk: the same numbers as the model in memory, one block at a time."""
    provider = streamed(source)
    skeleton, (model, _) = provider.model, load_model(str(source))
    run = functools.partial(streamed_losses, skeleton, provider, offload_bytes=0, offload_dir=tmp_path)
    table = made_up_table(linears_of(model))
    got = probe_factors(skeleton, linears_of(skeleton), table, TOKENS, 3, run=run)
    want = probe_factors(model, linears_of(model), table, TOKENS, 3)
    assert np.array_equal(got, want) and not np.allclose(want, 1.0)
    plan = {n: table.candidates[i % 3] for i, n in enumerate(table.names)}
    got = run(TOKENS, {"p": plan_variant(skeleton, linears_of(skeleton), plan, "none"), "f": Variant(3)})
    want = in_memory_losses(
        model, TOKENS, {"p": plan_variant(model, linears_of(model), plan, "none"), "f": Variant(3)}
    )
    assert got == want and got["p"] != got["f"]
    assert provider.most_live == 1 and not provider.live
    assert all(t.device.type == "meta" for t in skeleton.state_dict().values())
    assert not list(tmp_path.iterdir())  # the offloaded hidden states are removed


def test_streamed_penalty_search_equals_in_memory(source):
    provider = streamed(source)
    skeleton, (model, _) = provider.model, load_model(str(source))
    table = made_up_table(linears_of(model))

    def solve(t):
        alloc = allocate(t.errors, t.sizes, budget_bits(3.0, t.params), params=t.params)
        return t.plan(alloc), alloc

    run = functools.partial(streamed_losses, skeleton, provider)
    args = (table, solve, (4.0, 1e6), 3, TOKENS[:4])
    got = penalty_search(skeleton, linears_of(skeleton), *args, run=run)
    want = penalty_search(model, linears_of(model), *args)
    assert got[0] == want[0] and got[2] == want[2] and got[1].error == want[1].error


def worse_allocation(real):
    """A loss runner whose allocated layer sets measure 1 above their real loss: the check then keeps the
    uniform spec."""

    def run(*args, **kwargs):
        got = real(*args, **kwargs)
        return {k: v + 1.0 if k.startswith("layers-bpw-") else v for k, v in got.items()}

    return run


def test_streamed_check_writes_the_uniform_fallback(source, tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "in_memory_losses", worse_allocation(in_memory_losses))
    monkeypatch.setattr(budget_stream, "streamed_losses", worse_allocation(streamed_losses))
    recipe = Recipe.from_dict({**PROBES_CHECK, "allocate": {**GRID, "metric": "output", "check": True}})
    _, report = api.compress(str(source), recipe, tmp_path / "s", data=BLOCKS, budget=3.25, progress=False)
    _, ref = in_memory(source, recipe, tmp_path / "m", [3.25])
    (r,), (want,) = report.budgets, ref.budgets
    assert r["fallback"] is not None and r["fallback"] == want["fallback"] and r["losses"] == want["losses"]
    assert len({str(e["spec"]) for e in r["plan"].values()}) == 1  # one uniform spec
    assert_same(tmp_path / "s", tmp_path / "m")


def test_a_killed_job_with_the_check_resumes_bit_identically(source, tmp_path):
    """Killed in the write pass (after block 1's part): the resumed job measures nothing again and
    writes the same checkpoint."""
    code = (
        "import sys; from lowbit.compress.api import compress; from lowbit.compress.recipe import Recipe; "
        "from tests.compress.test_stream import BLOCKS; "
        f"recipe = Recipe.from_dict({PROBES_CHECK!r}); compress(sys.argv[1], recipe, sys.argv[2], "
        "data=BLOCKS, budget=3.0, max_shard_size=10_000, progress=False)"
    )
    env = {**os.environ, KILL_AFTER: "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(source), str(tmp_path / "s")], env=env, capture_output=True
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (tmp_path / "s").exists()
    (work,) = [p for p in (tmp_path / ".lowbit-work").iterdir() if p.is_dir()]
    measured = sorted(p.name for p in (work / "losses").iterdir())
    assert any(n.startswith("4x24-layers-") for n in measured)  # the check was measured before the kill
    recipe = Recipe.from_dict(PROBES_CHECK)
    api.compress(
        str(source), recipe, tmp_path / "s", data=BLOCKS, budget=3.0, max_shard_size=10_000, progress=False,
        keep_work=True,
    )
    assert sorted(p.name for p in (work / "losses").iterdir()) == measured  # nothing measured again
    in_memory(source, recipe, tmp_path / "m", [3.0])
    assert_same(tmp_path / "s", tmp_path / "m")
