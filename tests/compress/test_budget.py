"""Compressing to a bits-per-weight budget: ILP allocation, resumable stages, cached error table."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.compress import budget_passes
from lowbit.compress.allocate import AllocationError, layer_type
from lowbit.compress.api import compress
from lowbit.compress.recipe import Recipe
from lowbit.nn.checkpoint import checkpoint_info
from tests.conftest import NEWS, make_tiny_llama, make_tokenizer

GRID = {"formats": ["int"], "bits": [2, 3, 4], "group_sizes": [32, 64], "ranks": [0, 4]}


def recipe_file(tmp_path, **allocate):
    path = tmp_path / "recipe.json"
    recipe = {"allocate": {**GRID, **allocate}, "calibration": {"samples": 4, "seq_len": 32}}
    path.write_text(json.dumps(recipe))
    return path


def run_cli(*argv):
    return main([str(a) for a in argv])


def test_budget_is_respected_in_the_written_checkpoint(tiny_llama_dir, news_file, tmp_path):
    recipe = recipe_file(tmp_path)
    out = tmp_path / "multi"
    args = ["compress", "--model", tiny_llama_dir, "--recipe", recipe, "--data", news_file, "--out", out]
    assert run_cli(*args, "--budgets", "2.5,3.5", "--json") == 0
    assert (out / "report.json").is_file()
    report = json.loads((out / "report.json").read_text())
    kinds = sorted({p["kind"] for p in report["points"]})
    assert kinds == ["budget", "original", "rtn"]
    bpw = {}
    for b in (2.5, 3.5):
        info = checkpoint_info(out / f"bpw-{b:g}")  # recounted from the files
        bpw[b] = info["totals"]["bits_per_weight"]
        assert bpw[b] <= b
    assert bpw[2.5] < bpw[3.5]


def test_new_budget_reuses_calibration_and_error_table(tiny_llama_dir, news_file, tmp_path, monkeypatch):
    recipe = recipe_file(tmp_path)
    base = ["compress", "--model", tiny_llama_dir, "--recipe", recipe, "--data", news_file, "--json"]
    assert run_cli(*base, "--budget", "3", "--out", tmp_path / "z") == 0
    assert not (tmp_path / ".lowbit-work").exists()  # removed after success unless kept
    base.append("--keep-work")
    assert run_cli(*base, "--budget", "3", "--out", tmp_path / "a") == 0
    assert (tmp_path / ".lowbit-work").is_dir()

    def forbidden(*a, **k):
        raise AssertionError("the second run must not recompute this")

    monkeypatch.setattr(budget_passes, "calibrate_backward", forbidden)  # the Fisher pass of the table
    monkeypatch.setattr(budget_passes, "error_row", forbidden)
    assert run_cli(*base, "--budget", "2.5", "--out", tmp_path / "b") == 0
    assert checkpoint_info(tmp_path / "b")["totals"]["bits_per_weight"] <= 2.5
    # --restart discards the work area, so the same run now has to calibrate again
    with pytest.raises(AssertionError, match="must not recompute"):
        main([*map(str, base), "--budget", "2.5", "--out", str(tmp_path / "c"), "--restart"])


def test_infeasible_budget_names_the_achievable_range(tiny_llama_dir, news_file, tmp_path, capsys):
    recipe = recipe_file(tmp_path)
    code = run_cli(
        "compress",
        "--model",
        tiny_llama_dir,
        "--recipe",
        recipe,
        "--data",
        news_file,
        "--budget",
        "1",
        "--out",
        tmp_path / "o",
        "--json",
    )
    err = capsys.readouterr().err
    assert code == 2 and "smallest" in err and "largest" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_python_api_budget(tmp_path):
    recipe = Recipe.from_dict({"allocate": {**GRID, "metric": "frobenius"}})
    model, report = compress(make_tiny_llama(300), recipe, budget=3.0, progress=False)
    assert report.bits_per_weight <= 3.0
    assert report.budgets[0]["solver_status"] in ("optimal", "feasible")
    with pytest.raises(AllocationError):
        compress(make_tiny_llama(300), recipe, budget=1.0, progress=False)


def test_type_tie_gives_every_layer_of_a_type_one_spec():
    recipe = Recipe.from_dict({"allocate": {**GRID, "metric": "frobenius", "tie": "type"}})
    model, report = compress(make_tiny_llama(300), recipe, budget=3.0, progress=False)
    assert report.bits_per_weight <= 3.0
    specs: dict[str, set] = {}
    for name, entry in report.budgets[0]["plan"].items():
        specs.setdefault(layer_type(name), set()).add(json.dumps([entry["spec"], entry["rank"]]))
    assert len(specs) == 7 and all(len(s) == 1 for s in specs.values())
    assert len({next(iter(s)) for s in specs.values()}) > 1  # the types still differ: a real allocation


def test_budget_path_fine_tunes_each_budget_and_resumes(tmp_path):
    blocks = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(0))
    ft = {"mode": "l4q", "objective": "distill", "steps": 3, "batch_size": 2, "seq_len": 16, "rank": 2}
    ft |= {"lr": 1e-2, "scale_lr": 1e-2, "warmup": 0, "eval_blocks": 1, "patience": 0}
    recipe = Recipe.from_dict({"allocate": {**GRID, "metric": "frobenius"}, "finetune": ft})
    work = tmp_path / "work"
    kw = dict(budgets=[2.5, 3.5], calib_data=blocks, work_dir=work, keep_work=True, progress=False)
    model, report = compress(make_tiny_llama(300), recipe, **kw)
    assert all(e["rank"] == 0 for b in report.budgets for e in b["plan"].values())  # l4q merged
    assert any(work.glob("*/bpw-2.5-finetune")) and any(work.glob("*/bpw-3.5-finetune"))
    plain, _ = compress(
        make_tiny_llama(300),
        Recipe.from_dict(recipe.to_dict() | {"finetune": None}),
        budget=3.5,
        calib_data=blocks,
        progress=False,
    )
    name = "model.layers.0.mlp.down_proj"
    a, b = model.get_submodule(name), plain.get_submodule(name)
    assert not (torch.equal(a.scales, b.scales) and torch.equal(a.codes, b.codes))
    again, _ = compress(make_tiny_llama(300), recipe, **kw)  # resumes from the saved states
    assert torch.equal(again.get_submodule(name).codes, model.get_submodule(name).codes)


def tensors(folder):
    return load_file(str(folder / "model.safetensors"))


def test_resume_after_kill_is_bit_identical(tiny_llama_dir, news_file, tmp_path):
    recipe = recipe_file(tmp_path, ranks=[0, 4, 8])
    command = [
        sys.executable,
        "-m",
        "lowbit.cli",
        "compress",
        "--model",
        str(tiny_llama_dir),
        "--recipe",
        str(recipe),
        "--data",
        str(news_file),
        "--budget",
        "3",
        "--json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean = tmp_path / "clean"
    t0 = time.perf_counter()
    subprocess.run(
        [*command, "--out", str(clean), "--work-dir", str(tmp_path / "w1")],
        check=True,
        env=env,
        capture_output=True,
    )
    duration = time.perf_counter() - t0
    out, work = tmp_path / "resumed", str(tmp_path / "w2")
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # kill at random moments, each run getting further thanks to the saved stages
        p = subprocess.Popen(
            [*command, "--out", str(out), "--work-dir", work],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(duration * (0.3 + 0.6 * torch.rand(1, generator=g).item()))
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert not out.exists() or (out / "lowbit_config.json").is_file()  # never half-written
    if not out.exists():
        subprocess.run(
            [*command, "--out", str(out), "--work-dir", work], check=True, env=env, capture_output=True
        )
    a, b = tensors(clean), tensors(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_table_rounding_is_separate_from_the_final_rounding(monkeypatch):
    from lowbit.compress.recipe import RecipeError
    with pytest.raises(RecipeError, match="allocate.rounding"):
        Recipe.from_dict({"allocate": {"rounding": "stochastic"}})
    seen = {"table": set(), "final": set()}
    error_row, apply_choice = budget_passes.error_row, budget_passes.apply_choice

    def table_row(*a, rounding, **k):
        seen["table"].add(rounding)
        return error_row(*a, rounding=rounding, **k)

    def final_layer(lin, choice, *a):
        seen["final"].add(choice.rounding)
        return apply_choice(lin, choice, *a)

    monkeypatch.setattr(budget_passes, "error_row", table_row)
    monkeypatch.setattr(budget_passes, "apply_choice", final_layer)
    recipe = Recipe.from_dict(
        {
            "quantize": {"rounding": "gptq"},
            "allocate": {**GRID, "rounding": "nearest"},
            "calibration": {"samples": 4, "seq_len": 16},
        }
    )
    blocks = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    compress(make_tiny_llama(300), recipe, budget=3.0, calib_data=blocks, progress=False)
    assert seen == {"table": {"nearest"}, "final": {"gptq"}}


@pytest.mark.parametrize("method", ["lorc", "lqlora"])
def test_table_rows_split_by_spec_equal_the_whole_row(method):
    """Several processes measure a layer's row in parts, one per spec (`_spec_parts`); put back in place
    they are the row measured whole, bit for bit, with and without the layer's statistics."""
    from lowbit.compress.allocate import candidate_grid, error_row
    from lowbit.lowrank import Stats

    gen = torch.Generator().manual_seed(0)
    W, X = torch.randn(24, 48, generator=gen), torch.randn(96, 48, generator=gen)
    grid = candidate_grid(("int", "nf"), (2, 3, 4), (16, 32), (0, 4))
    parts = budget_passes._spec_parts(grid)
    assert len(parts) > 1 and sorted(i for p in parts for i in p) == list(range(len(grid)))
    for stats, metric in ((None, "frobenius"), (Stats(H=X.T @ X / 96, fisher=W.abs()), "output")):
        kw = dict(stats=stats, metric=metric, iterations=2)
        errors, sizes = error_row(W, grid, method, **kw)
        for part in parts:
            e, z = error_row(W, [grid[i] for i in part], method, **kw)
            assert (e == errors[part]).all() and (z == sizes[part]).all()


def test_layer_cost_weighs_the_input_width():
    """down_proj [896, 4864] costs more than up_proj [4864, 896] (measured: 3.4x its table rows), which
    weight size alone (N K) made equal; a layer twice as tall costs twice as much."""
    from lowbit.compress.ranks import layer_cost

    assert layer_cost((896, 4864)) / layer_cost((4864, 896)) == pytest.approx(3.21, rel=0.01)
    assert layer_cost((2 * 896, 896)) == 2 * layer_cost((896, 896))


def test_second_pass_balances_the_processes_over_a_window_of_blocks():
    """With the 0.5B shape's proportions (intermediate 5.4x hidden), a block's down_proj costs more than
    the rest of its block: one block at a time its owner works while the other waits. Over
    `blocks_at_once` blocks each of two processes owns one down_proj and the loads are within 5%."""
    from lowbit.compress.ranks import layer_cost, layer_owners
    from lowbit.parallel import World

    model = make_tiny_llama(300, intermediate_size=348)
    w = World(0, 2)
    assert budget_passes.blocks_at_once(w) == 2 and budget_passes.blocks_at_once(World()) == 1
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    block = [n for n in names if ".layers.0." in n]
    cost = {n: layer_cost(model.get_submodule(n).weight.shape) for n in names}
    down = "model.layers.0.mlp.down_proj"
    assert cost[down] > sum(cost[n] for n in block) - cost[down]
    own = layer_owners(model, names, w)
    assert {own[n] for n in names if n.endswith("down_proj")} == {0, 1}
    loads = [sum(c for n, c in cost.items() if own[n] == r) for r in range(2)]
    assert max(loads) / min(loads) < 1.05


@pytest.mark.parametrize("finetune", [False, True])
def test_double_quantized_scales_are_counted_saved_and_reloaded(tmp_path, finetune):
    # the budget recipes' scales are double-quantized: the ILP's count must be what the files hold, and
    # the checkpoint (after l4q's merge too) must reload into the model that was compressed
    blocks = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(0))
    ft = {"mode": "l4q", "objective": "distill", "steps": 2, "batch_size": 2, "seq_len": 16, "rank": 2}
    ft |= {"warmup": 0, "eval_blocks": 1, "patience": 0}
    recipe = Recipe.from_dict(
        {
            "quantize": {"format": "int3", "group_size": 32, "double_quant": True, "rounding": "gptq"},
            "allocate": {**GRID, "formats": ["int", "nf4"], "metric": "frobenius"},
            "finetune": ft if finetune else None,
        }
    )
    out = tmp_path / "dq"
    model, report = compress(make_tiny_llama(300), recipe, out, budget=3.5, calib_data=blocks, progress=False)
    info = checkpoint_info(out)  # recounted from the files
    assert info["totals"]["bits_per_weight"] == pytest.approx(report.bits_per_weight)
    assert report.bits_per_weight <= 3.5
    assert all(layer["double_quant"] for layer in info["layers"].values())
    ids = blocks[:2]
    with torch.no_grad():
        assert torch.equal(lowbit.load(out)(input_ids=ids).logits, model(input_ids=ids).logits)


def _codes(model) -> dict:
    return {n: m.codes.clone() for n, m in model.named_modules() if hasattr(m, "codes")}


@pytest.mark.parametrize("streamed", [False, True])
def test_allocated_layers_see_the_quantized_blocks_before_them(tmp_path, streamed):
    """With allocate.propagate "quantized" a budget whose grid holds one spec builds the layers GPTQ's
    sequential protocol builds: the uniform recipe's codes, bit for bit; on the float model's inputs
    ("original") the later blocks' codes differ. Streamed from a folder (without the check: the layers
    handed to the writer block by block), the same codes are written."""
    one = {"formats": ["int"], "bits": [3], "group_sizes": [32], "ranks": [0]}
    quantize = {"format": "int3", "group_size": 32, "rounding": "gptq"}
    common = {"quantize": quantize, "decompose": {"method": "lorc"}}
    blocks = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    source = make_tiny_llama(300, num_hidden_layers=3)
    uniform, _ = compress(copy.deepcopy(source), Recipe.from_dict(common), calib_data=blocks, progress=False)
    want = _codes(uniform)
    got = {}
    for propagate in ("quantized", "original"):
        allocate = {**one, "propagate": propagate, "check": not streamed}
        recipe = Recipe.from_dict({**common, "allocate": allocate})
        if streamed:
            folder, out = tmp_path / "src", tmp_path / propagate
            source.save_pretrained(folder)
            make_tokenizer(NEWS).save_pretrained(folder)
            compress(str(folder), recipe, out, budget=4.0, calib_data=blocks, progress=False)
            tensors = load_file(out / "model.safetensors")
            got[propagate] = {k.removesuffix(".codes"): v for k, v in tensors.items() if k.endswith(".codes")}
        else:
            model, _ = compress(copy.deepcopy(source), recipe, budget=4.0, calib_data=blocks, progress=False)
            got[propagate] = _codes(model)
    assert got["quantized"].keys() == want.keys()
    assert all(torch.equal(got["quantized"][n], want[n]) for n in want)
    first = [n for n in want if ".layers.0." in n]
    assert all(torch.equal(got["original"][n], want[n]) for n in first)  # block 0 reads the same inputs
    assert not all(torch.equal(got["original"][n], want[n]) for n in want)
