"""The budget path with activation-aware scaling, probes and the uniform check (lowbit.compress.budget,
lowbit.compress.probes), on a tiny random Llama whose norms make a few input channels outliers."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.calibration import calibrate
from lowbit.cli import build_parser, resolve_recipe
from lowbit.compress import budget
from lowbit.compress.allocate import Candidate, ErrorTable, allocate, budget_bits, error_table
from lowbit.compress.blocks import InMemory
from lowbit.compress.budget import compress_to_budgets, readers_of, table_stage
from lowbit.compress.budget_passes import ScaledBlocks
from lowbit.compress.losses import calibration_loss, replaced_modules
from lowbit.compress.presets import BUDGET_PRESET, preset
from lowbit.compress.presets import resolve_recipe as resolve_presets
from lowbit.compress.probes import (
    best_uniform,
    corrected,
    penalized,
    penalty_search,
    plan_loss,
    probe_factors,
)
from lowbit.compress.recipe import Recipe, RecipeError
from lowbit.compress.uniform import select_linears
from lowbit.compress.workarea import WorkArea
from lowbit.lowrank import Stats, decompose
from lowbit.quantizers import QuantSpec
from lowbit.quantizers.clip import nearest
from tests.compress.test_awq import CALIB, HELD_OUT, outlier_llama
from tests.conftest import logits

GRID = {"formats": ["int"], "bits": [2, 3, 4], "group_sizes": [64, 128], "ranks": [0]}
SCALING = {"method": "awq", "objective": "layers", "grid": 5, "clip": False}


def budget_recipe(**allocate) -> Recipe:
    return Recipe.from_dict(
        {
            "quantize": {"format": "int3", "group_size": 128},
            "scaling": SCALING,
            "allocate": {**GRID, "budget": 3.0, "metric": "output", **allocate},
            "calibration": {"samples": 8, "seq_len": 32},
        }
    )


def scaled_table(model, work, calib):
    """The error table of the budget recipe, AWQ's scales searched (or replayed) per block."""
    recipe = budget_recipe()
    linears = select_linears(model, recipe)
    readers = readers_of(model)
    provider = ScaledBlocks(InMemory(model), readers, linears, work)
    return table_stage(model, provider, linears, recipe, calib, work, False, readers)


def test_scaling_keeps_float_logits_and_replays_on_resume(tmp_path):
    model = outlier_llama()
    before = copy.deepcopy(model)
    work = WorkArea(tmp_path, {"job": 1})
    table = scaled_table(model, work, CALIB)
    ref, got = logits(before, HELD_OUT), logits(model, HELD_OUT)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert not torch.equal(
        model.model.layers[0].input_layernorm.weight, before.model.layers[0].input_layernorm.weight
    )
    replay = copy.deepcopy(before)  # a resumed job: the saved table and scales, no search
    again = scaled_table(replay, work, None)
    assert torch.equal(again.errors, table.errors)
    for (name, p), q in zip(model.named_parameters(), replay.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_budget_path_with_scaling_is_closer_to_float_at_int3():
    """Every candidate measured and rounded on the scaled weights: at a budget that buys int3-g128
    everywhere the scaled model's logits are closer to the float model's than without scaling."""
    original = outlier_llama()
    errors = {}
    for name, scaling in {"plain": {}, "awq": SCALING}.items():
        recipe = Recipe.from_dict({**budget_recipe().to_dict(), "scaling": scaling})
        model = copy.deepcopy(original)
        with budget.work_area(None, recipe, None, None, restart=False) as work:
            compress_to_budgets(model, recipe, [3.25], work, calib_data=CALIB, outs=[None], progress=False)
        errors[name] = float((logits(model, HELD_OUT) - logits(original, HELD_OUT)).square().mean())
    assert errors["awq"] < errors["plain"], errors


def tiny_table(model, blocks=CALIB):
    recipe = budget_recipe()
    linears = select_linears(model, recipe)
    specs = [QuantSpec(f"int{b}", group_size=64) for b in (2, 3, 4)]
    cands = [Candidate(s) for s in specs]
    cal = calibrate(model, blocks, stats=("hessian",), layers=list(linears), progress=False)
    stats = {n: Stats(H=st.hessian_matrix()) for n, st in cal.layers.items()}
    weights = {n: m.weight.detach().float() for n, m in linears.items()}
    return linears, error_table(weights, cands, "none", stats=stats, metric="output")


def test_probe_factors_match_measured_loss_and_restore_weights():
    """With every block probed, the corrected table's summed error of a spec is the measured loss increase
    of rounding every layer of each block to it, block by block; the weights are put back."""
    model = outlier_llama()
    linears, table = tiny_table(model)
    before = {n: m.weight.clone() for n, m in linears.items()}
    k = probe_factors(model, linears, table, CALIB[:4], probes=2)
    for n, m in linears.items():
        assert torch.equal(m.weight, before[n]), n
    fixed = corrected(table, k)
    base = calibration_loss(model, CALIB[:4])
    c = 0  # int2-g64: a loss increase far above noise
    measured = 0.0
    for b in range(2):
        rows = [n for n in linears if n.startswith(f"model.layers.{b}.")]
        W0 = {n: linears[n].weight.data for n in rows}
        for n in rows:
            linears[n].weight.data = nearest(W0[n], table.candidates[c].spec)
        measured += calibration_loss(model, CALIB[:4]) - base
        for n in rows:
            linears[n].weight.data = W0[n]
    assert measured > 0
    assert float(fixed.errors[:, c].sum()) == pytest.approx(measured, rel=1e-6)
    assert all(k > 0)


def test_plan_loss_is_the_rounded_models_loss_and_restores_weights():
    """plan_loss equals the calibration loss of the model whose weights were replaced by hand with each
    planned candidate's round-to-nearest Q + L1 L2; the weights are put back."""
    model = outlier_llama()
    linears = select_linears(model, budget_recipe())
    names = list(linears)
    cands = [Candidate(QuantSpec("int2", 64), 4), Candidate(QuantSpec("int3", 32, symmetric=True))]
    plan = {n: cands[i % 2] for i, n in enumerate(names)}
    before = {n: m.weight.clone() for n, m in linears.items()}
    got = plan_loss(model, linears, plan, CALIB[:4], "lorc")
    for n, m in linears.items():
        assert torch.equal(m.weight, before[n]), n
    by_hand = copy.deepcopy(model)
    for n in names:
        W = by_hand.get_submodule(n).weight
        W.data = decompose(W.data, plan[n].spec, plan[n].rank, "lorc").weight()
    assert got == pytest.approx(calibration_loss(by_hand, CALIB[:4]), rel=1e-6)
    assert got > calibration_loss(model, CALIB[:4])


def test_penalty_search_keeps_the_plan_with_the_least_measured_loss():
    """Each penalty's plan is the ILP's on the penalised table; the search returns the plan whose
    measured loss is least, never above the unpenalised plan's (penalty 1)."""
    model = outlier_llama()
    linears, table = tiny_table(model)
    budget = 3.0
    solved = {}

    def solve(t):
        alloc = allocate(t.errors, t.sizes, budget_bits(budget, t.params), params=t.params)
        return t.plan(alloc), alloc

    plan, alloc, losses = penalty_search(model, linears, table, solve, (4.0, 1e6), 3, CALIB[:4])
    assert list(losses) == ["penalty-1", "penalty-4", "penalty-1e+06"]
    for p in (1.0, 4.0, 1e6):
        solved[p] = solve(penalized(table, 3, p))[0]
        assert losses[f"penalty-{p:g}"] == plan_loss(model, linears, solved[p], CALIB[:4], "none")
    assert min(losses.values()) <= losses["penalty-1"]
    assert plan_loss(model, linears, plan, CALIB[:4], "none") == min(losses.values())
    rows = [table.names.index(n) for n in plan]
    cols = [table.candidates.index(c) for c in plan.values()]
    assert alloc.error == pytest.approx(float(table.errors[rows, cols].sum()))  # unpenalised units
    low = np.array([c.spec.bits < 3 for c in table.candidates])
    fewest = sum(c.spec.bits < 3 for c in solved[1e6].values())
    assert fewest <= sum(c.spec.bits < 3 for c in solved[1.0].values())
    assert float(penalized(table, 3, 4.0).errors[:, low].sum()) == pytest.approx(
        4 * float(table.errors[:, low].sum())
    )


def test_best_uniform_fits_the_budget():
    names, shapes = ["a", "b"], [(4, 128), (4, 128)]
    cands = [Candidate(QuantSpec(f"int{b}", group_size=128)) for b in (2, 3, 4)] + [
        Candidate(QuantSpec("int4", group_size=128), 8)
    ]
    sizes = np.array([[2 * 512 + 256, 3 * 512 + 256, 4 * 512 + 256, 99999]] * 2)
    table = ErrorTable(names, shapes, cands, np.array([[0.0, 3.0, 1.0, 0.1]] * 2), sizes)
    assert best_uniform(table, 3.5) == 1  # the most bits that fit, whatever the table says
    assert best_uniform(table, 4.5) == 2
    assert best_uniform(table, 1.0) is None
    allowed = np.ones((2, 4), dtype=bool)
    allowed[0, 1] = False
    assert best_uniform(table, 3.5, allowed) == 0


def test_check_rejects_an_allocation_worse_than_uniform(monkeypatch):
    """A table that lies (int2 looks free) makes the ILP choose int2 for every layer it can; the check
    measures both models and keeps the best uniform spec at no more bits."""
    recipe = budget_recipe(check=True)
    real = budget.table_stage

    def lying(*args, **kwargs):
        table = real(*args, **kwargs)
        errors = table.errors.clone()
        errors[:, [c.spec.bits == 2 for c in table.candidates]] = 0.0
        return ErrorTable(table.names, table.shapes, table.candidates, errors, table.sizes, table.info)

    monkeypatch.setattr(budget, "table_stage", lying)
    model = outlier_llama()
    with budget.work_area(None, recipe, None, None, restart=False) as work:
        (r,) = compress_to_budgets(model, recipe, [3.25], work, calib_data=CALIB, outs=[None], progress=False)
    assert r.fallback is not None and r.fallback.startswith("int3")
    uniform = r.losses[f"uniform-{r.fallback}"]
    assert uniform < r.losses["allocated"]
    assert {e["spec"]["format"] for e in r.plan.values()} == {"int3"}
    assert calibration_loss(model, CALIB) == pytest.approx(uniform, rel=1e-6)


def test_replaced_modules_puts_the_layers_back():
    model = outlier_llama()
    name = "model.layers.0.mlp.up_proj"
    old = model.get_submodule(name)
    zero = nn.Linear(old.in_features, old.out_features, bias=False)
    nn.init.zeros_(zero.weight)
    with replaced_modules(model, {name: zero}):
        changed = calibration_loss(model, CALIB[:2])
    assert changed != calibration_loss(model, CALIB[:2])
    assert model.get_submodule(name) is old


def test_recipe_allows_scaling_with_a_budget_without_clip():
    assert preset("alloc-awq").allocate.check and preset("alloc-awq").allocate.probes == 3
    assert Recipe.from_dict(preset("alloc-awq").to_dict()) == preset("alloc-awq")
    with pytest.raises(RecipeError, match="clip"):
        Recipe.from_dict({"scaling": {"method": "awq"}, "allocate": {"budget": 3.0}})
    with pytest.raises(RecipeError, match="SVDQuant"):
        Recipe.from_dict({"decompose": {"method": "svdquant"}, "allocate": {"check": True}})
    with pytest.raises(RecipeError, match="probes"):
        Recipe.from_dict({"allocate": {"probes": -1}})
    with pytest.raises(RecipeError, match="penalties"):
        Recipe.from_dict({"allocate": {"penalties": [0.5]}})


def test_cli_budget_without_a_preset_takes_the_budget_recipe(tiny_llama_dir):
    def recipe(*argv):
        return resolve_recipe(build_parser().parse_args(["compress", "--out", "x", *argv]))

    assert recipe("--budget", "3") == preset(BUDGET_PRESET) == resolve_presets(None, [3.0])
    assert recipe("--budgets", "3,3.5") == preset(BUDGET_PRESET)
    assert recipe() == preset("int4-g128") == resolve_presets(None)
    assert recipe("--budget", "3", "--preset", "alloc-int") == preset("alloc-int")
    # below 3 bits the default fine-tunes, unless the model is streamed from a folder
    assert recipe("--budget", "2.5") == preset("alloc-rot-ft") == resolve_presets(None, [2.5])
    assert recipe("--budgets", "2.5,3.5") == preset("alloc-rot-ft")
    assert recipe("--budget", "2.5", "--model", str(tiny_llama_dir)) == preset(BUDGET_PRESET)
    assert resolve_presets(None, [2.5], streamed=True) == preset(BUDGET_PRESET)
    for name in ("alloc-awq", "alloc-rot"):
        tuned = preset(f"{name}-ft")
        assert tuned == replace(preset(name), finetune=tuned.finetune)
        assert tuned.finetune["data"] == "calibration" and tuned.finetune["mode"] == "l4q"
    # on rotated weights l4q's latent starts halfway inside its cell (docs/benchmarks.md)
    rot_ft = preset("alloc-rot-ft").finetune
    assert rot_ft["latent_inset"] == 0.5 and rot_ft["steps"] == 100
    assert preset("alloc-awq-ft").finetune["latent_inset"] is None
    # the lowbit target's default rotates with an online transform that other engines lack: they get AWQ
    assert preset(BUDGET_PRESET).rotate.online_down and preset(BUDGET_PRESET).scaling.method == "none"
    # rotations instead of scales, and double-quantized scales (docs/benchmarks.md)
    rot = preset("alloc-rot")
    assert rot.quantize == replace(preset("alloc-awq").quantize, double_quant=True)
    assert rot == replace(preset("alloc-awq"), quantize=rot.quantize, scaling=rot.scaling, rotate=rot.rotate)
    for target in ("vllm", "llama.cpp"):
        assert recipe("--budget", "3", "--target", target) == preset("alloc-awq")
        assert recipe("--budget", "2.5", "--target", target) == preset("alloc-awq-ft")
        assert resolve_presets(None, [3.0], target=target) == preset("alloc-awq")
    assert recipe("--budget", "3", "--target", "lowbit") == preset(BUDGET_PRESET)
    # from 4 bits NF4 joins the grid (every budget at least 4), for the lowbit target only, fine-tuned
    # unless streamed
    assert recipe("--budget", "4.25") == preset("alloc-rot-nf4-ft")
    assert resolve_presets(None, [4.25], streamed=True) == preset("alloc-rot-nf4")
    assert resolve_presets(None, [4.0, 4.25]) == preset("alloc-rot-nf4-ft")
    assert recipe("--budgets", "3.25,4.25") == preset(BUDGET_PRESET)
    assert recipe("--budget", "4.25", "--target", "vllm") == preset("alloc-awq")
    # ... with int8 too, one spec per layer type (docs/benchmarks.md, "One spec per layer type")
    nf4 = replace(preset("alloc-rot").allocate, formats=("int", "nf3", "nf4"), bits=(2, 3, 4, 8), tie="type")
    assert preset("alloc-rot-nf4") == replace(preset("alloc-rot"), allocate=nf4)
    # ... fine-tuned as alloc-rot-ft, at a fifth of its learning rates ("Fine-tuning at 4 bits")
    nf4_ft = preset("alloc-rot-nf4-ft")
    assert nf4_ft == replace(preset("alloc-rot-nf4"), finetune=nf4_ft.finetune)
    assert (rot_ft["lr"], rot_ft["scale_lr"]) == (1e-4, 1e-5)
    assert nf4_ft.finetune == {**rot_ft, "lr": 2e-5, "scale_lr": 2e-6}
