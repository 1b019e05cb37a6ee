"""Bit allocation: the ILP against brute force, budgets, constraints, the greedy baseline, error tables."""

import importlib.util
import itertools
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.compress.allocate import (
    AllocationError,
    Candidate,
    ErrorTable,
    allocate,
    allocate_greedy,
    budget_bits,
    candidate_bits,
    candidate_grid,
    constraint_mask,
    error_row,
    error_table,
    layer_type,
    merge_groups,
    type_groups,
)
from lowbit.lowrank import Stats, decompose
from lowbit.quantizers import QuantSpec, storage_bits

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench_allocate.py"


def random_problem(seed: int, M: int = 4, C: int = 4, holes: bool = False):
    """Random errors [M, C], integer sizes [M, C] and a budget between the smallest and largest total."""
    rng = np.random.default_rng(seed)
    S = rng.integers(10, 200, size=(M, C))
    E = rng.uniform(0.0, 10.0, size=(M, C)) * rng.lognormal(0.0, 1.0, size=(M, 1))
    allowed = None
    if holes:
        allowed = rng.random((M, C)) < 0.8
        allowed[np.arange(M), rng.integers(0, C, M)] = True
        E[rng.random((M, C)) < 0.1] = np.inf
        E[np.arange(M), rng.integers(0, C, M)] = 1.0
    usable = np.isfinite(E) & (True if allowed is None else allowed)
    lo = np.where(usable, S, 10**9).min(1).sum()
    hi = np.where(usable, S, 0).max(1).sum()
    return E, S, int(rng.integers(lo, hi + 1)), allowed


def brute_force(E, S, budget, allowed=None, tied=()) -> float:
    M, C = E.shape
    ok = np.isfinite(E) & (True if allowed is None else allowed)
    best = math.inf
    for choice in itertools.product(range(C), repeat=M):
        rows = np.arange(M)
        if any(len({choice[m] for m in group}) > 1 for group in tied):
            continue
        if ok[rows, choice].all() and S[rows, choice].sum() <= budget:
            best = min(best, E[rows, choice].sum())
    return best


@pytest.mark.parametrize("holes", [False, True])
def test_ilp_equals_brute_force(holes):
    for seed in range(40):
        E, S, budget, allowed = random_problem(seed, holes=holes)
        a = allocate(E, S, budget, allowed=allowed)
        assert a.error == pytest.approx(brute_force(E, S, budget, allowed), rel=1e-9, abs=1e-12)
        rows = np.arange(len(a.choice))
        assert a.bits == S[rows, a.choice].sum() <= budget
        assert a.error == pytest.approx(E[rows, a.choice].sum())
        assert allowed is None or allowed[rows, a.choice].all()
        assert a.status == "optimal"


@pytest.mark.parametrize("holes", [False, True])
def test_tied_groups_take_one_candidate_and_equal_brute_force(holes):
    """Ties (q/k/v, gate/up of one block for vLLM): the ILP's optimum equals brute force over the choices
    that give every member of a group the same candidate; greedy keeps the ties too."""
    tied = [[0, 2, 3], [1, 4]]
    solved = 0
    for seed in range(30):
        E, S, _, allowed = random_problem(seed, M=6, C=3, holes=holes)
        ok = np.isfinite(E) & (True if allowed is None else allowed)
        sums = [np.where(ok[g].all(0), S[g].sum(0), 10**9) for g in tied]
        lo = sum(x.min() for x in sums) + np.where(ok[5], S[5], 10**9).min()
        if lo >= 10**9:  # some group has no candidate allowed for all its members
            with pytest.raises(AllocationError, match="tied together"):
                allocate(E, S, 10**9, allowed=allowed, tied=tied)
            continue
        budget = int(lo) + seed * 7
        for solver in (allocate, allocate_greedy):
            a = solver(E, S, budget, allowed=allowed, tied=tied)
            assert all(len(set(a.choice[g].tolist())) == 1 for g in tied)
            assert a.bits <= budget and (allowed is None or allowed[np.arange(6), a.choice].all())
        assert a.error >= allocate(E, S, budget, allowed=allowed, tied=tied).error - 1e-9
        best = allocate(E, S, budget, allowed=allowed, tied=tied)
        assert best.error == pytest.approx(brute_force(E, S, budget, allowed, tied), rel=1e-9, abs=1e-12)
        solved += 1
    assert solved >= 10
    with pytest.raises(AllocationError, match="already tied"):
        allocate(E, S, 10**9, tied=[[0, 1], [1, 2]])
    with pytest.raises(AllocationError, match="indices below 6"):
        allocate(E, S, 10**9, tied=[[0, 6]])


def test_ilp_never_worse_than_greedy_and_both_respect_budget():
    for seed in range(12):
        E, S, budget, allowed = random_problem(100 + seed, M=30, C=12, holes=seed % 2 == 1)
        a = allocate(E, S, budget, allowed=allowed)
        g = allocate_greedy(E, S, budget, allowed=allowed)
        assert a.bits <= budget and g.bits <= budget
        assert a.error <= g.error * (1 + 1e-12)
        rows = np.arange(30)
        assert g.error == pytest.approx(E[rows, g.choice].sum())
        assert allowed is None or (allowed[rows, a.choice].all() and allowed[rows, g.choice].all())


def test_ilp_beats_greedy_where_ratios_mislead():
    # matrix 1's first upgrade has the best error drop per bit, so the Lagrangian takes it and then
    # fills with matrix 1's next one (error 10 + 3); the optimum spends all 3 bits on matrix 0 (0 + 10)
    E = np.array([[10.0, 0.0, np.inf], [10.0, 6.5, 3.0]])
    S = np.array([[0, 3, 9], [0, 1, 3]])
    a, g = allocate(E, S, 3), allocate_greedy(E, S, 3)
    assert a.error == 10.0 and a.choice.tolist() == [1, 0] and a.status == "optimal"
    assert g.error == 13.0 and g.choice.tolist() == [0, 2] and g.bits == 3


def test_loose_budget_takes_the_most_accurate_candidates(caplog):
    E, S, _, _ = random_problem(7)
    with caplog.at_level("INFO", logger="lowbit.compress.allocate"):
        a = allocate(E, S, int(S.max(1).sum()))
    assert a.error == pytest.approx(E.min(1).sum()) and a.status == "optimal"
    assert "allocation (optimal)" in caplog.text and " s" in caplog.text


def test_infeasible_budget_names_smallest_and_largest_bpw():
    E = np.ones((2, 2))
    S = np.array([[200, 400], [300, 500]])
    with pytest.raises(AllocationError, match=r"5\.0000 bits per weight.*9\.0000 bits per weight"):
        allocate(E, S, 400, params=100)
    with pytest.raises(AllocationError, match="500 bits.*900 bits"):
        allocate_greedy(E, S, 400)
    with pytest.raises(AllocationError, match="matrix 1 has no allowed candidate"):
        allocate(E, S, 900, allowed=np.array([[True, True], [False, False]]))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(AllocationError, match="NaN"):
        allocate(np.array([[np.nan]]), np.array([[1]]), 1)
    with pytest.raises(AllocationError, match="same shape|one shape"):
        allocate(np.ones((2, 2)), np.ones((2, 3)), 10)
    with pytest.raises(AllocationError, match="non-negative integers"):
        allocate(np.ones((1, 2)), np.array([[1.5, 2.0]]), 10)
    with pytest.raises(AllocationError, match="positive number of bits per weight"):
        budget_bits(-1.0, 100)
    assert budget_bits(2.5, 3) == 8  # round(7.5)


def test_7b_size_problem_solves_under_10s():
    spec = importlib.util.spec_from_file_location("bench_allocate", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shapes, candidates = bench.LLAMA_7B_LAYER * 32, candidate_grid()
    assert len(shapes) == 224 and len(candidates) >= 100
    E, S = bench.synthetic_table(shapes, candidates, seed=0)
    budget = budget_bits(3.0, sum(n * k for n, k in shapes))
    t0 = time.perf_counter()
    a = allocate(E, S, budget)
    assert time.perf_counter() - t0 < 10 and a.seconds < 10
    g = allocate_greedy(E, S, budget)
    assert a.bits <= budget and a.error <= g.error * (1 + 1e-12)
    quick = allocate(E, S, budget, time_limit=0.5)  # stopped early: still feasible, never worse than greedy
    assert quick.bits <= budget and quick.error <= g.error * (1 + 1e-12)
    assert quick.status in ("optimal", "feasible", "greedy")


def test_candidate_grid():
    grid = candidate_grid()
    assert len(grid) == 7 * 3 * 5  # int2/3/4/8 and nf2/3/4 (no nf8), 3 group sizes, 5 ranks
    assert {c.spec.format for c in grid} == {"int2", "int3", "int4", "int8", "nf2", "nf3", "nf4"}
    assert [c.rank for c in grid[:5]] == [0, 8, 16, 32, 64] and len(set(grid)) == len(grid)
    fp = candidate_grid(("fp",), (4, 8), (None,), (0,))
    assert [c.spec.format for c in fp] == ["fp4_e2m1", "fp8_e4m3", "fp8_e5m2"]
    base = QuantSpec(symmetric=True, double_quant=True)
    assert all(c.spec.symmetric and c.spec.double_quant for c in candidate_grid(("int4",), (4,), base=base))
    both = candidate_grid(("int3", "nf3"), (3,), (128, None), (0,), symmetric=(False, True))
    assert [c.spec.short() for c in both] == [
        "int3-g128", "int3-g128-sym", "int3-pc", "int3-pc-sym", "nf3-g128", "nf3-pc"
    ]
    with pytest.raises(AllocationError, match="unknown format"):
        candidate_grid(("int9",))
    with pytest.raises(AllocationError, match="empty"):
        candidate_grid(("nf",), (8,))
    with pytest.raises(AllocationError, match="group size"):
        candidate_grid(group_sizes=(12,))


def test_candidate_bits_is_exact():
    spec = QuantSpec("int3", 64)
    for shape, r in [((96, 80), 0), ((96, 80), 8), ((11008, 4096), 64)]:
        c = Candidate(spec, r)
        assert candidate_bits(c, shape) == storage_bits(spec, shape) + r * (shape[0] + shape[1]) * 32
        assert candidate_bits(c, shape, 16) == storage_bits(spec, shape) + r * sum(shape) * 16
        assert candidate_bits(c, shape, 16, smooth=True) == candidate_bits(c, shape, 16) + shape[1] * 16


NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
GRID = candidate_grid(("int",), (2, 3, 4), (32,), (0, 8))


def test_constraint_mask_pins_forbid_min_bits():
    pin = Candidate(QuantSpec("int4", 32), 8)
    mask = constraint_mask(
        NAMES,
        GRID,
        pins={"model.layers.0.*": pin, "*.q_proj": {"bits": 2}},
        forbid=[("*.down_proj", {"bits": 2})],
        min_bits={"model.layers.1.*": 4},
    )
    bits = np.array([c.spec.bits for c in GRID])
    assert mask[0].tolist() == [c == pin for c in GRID]  # first matching pin wins
    assert mask[1].tolist() == [c == pin for c in GRID]
    assert (mask[2] == (bits >= 4)).all()
    E = np.tile(bits.astype(float) * -1.0 + 10.0, (3, 1))  # fewer bits -> larger error
    S = np.tile(bits * 100, (3, 1))
    a = allocate(E, S, int(S.max(1).sum()), allowed=mask)
    assert all(mask[m, c] for m, c in enumerate(a.choice))
    with pytest.raises(AllocationError, match="leave layer 'model.layers.1.mlp.down_proj' no candidate"):
        constraint_mask(NAMES, GRID, min_bits={"*.down_proj": 4}, forbid=[("*.layers.1.*", {"bits": 4})])
    with pytest.raises(AllocationError, match="not in the candidate grid"):
        constraint_mask(NAMES, GRID, pins={"*": Candidate(QuantSpec("nf4", 32), 0)})
    with pytest.raises(AllocationError, match="unknown candidate predicate"):
        constraint_mask(NAMES, GRID, forbid=[("*", {"bitz": 2})])
    with pytest.raises(AllocationError, match="pattern, predicate"):
        constraint_mask(NAMES, GRID, forbid=["*.down_proj"])


def test_forbid_lists_and_rank():
    mask = constraint_mask(NAMES, GRID, forbid=[("*", {"bits": [2, 3], "rank": 0})])
    ok = [not (c.spec.bits in (2, 3) and c.rank == 0) for c in GRID]
    assert (mask == np.array(ok)[None, :]).all()


def test_layer_types_and_merged_groups():
    names = [f"model.layers.{i}.{leaf}" for i in (0, 1, 12) for leaf in ("self_attn.q_proj", "mlp.down_proj")]
    assert layer_type("model.layers.12.mlp.down_proj") == "model.layers.mlp.down_proj"
    assert layer_type("model.layers.3.experts.7.w1") == "model.layers.experts.w1"
    assert layer_type("model.layers2.q_proj") == "model.layers2.q_proj"  # a number inside a name stays
    assert type_groups(names) == [[0, 2, 4], [1, 3, 5]]
    assert type_groups(["lm_head", *names[:1]]) == []  # a type of one layer is no tie
    assert merge_groups([[0, 1], [2, 3], [5, 6], [3, 0]]) == [[0, 1, 2, 3], [5, 6]]
    assert merge_groups([[4, 1], [7]]) == [[1, 4]]


def test_type_tie_chooses_one_candidate_per_type_and_equals_brute_force():
    from lowbit.compress.budget import allowed_mask
    from lowbit.compress.recipe import AllocateConfig, Recipe, RecipeError

    leaves = ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")
    names = [f"model.layers.{i}.{leaf}" for i in range(2) for leaf in leaves]
    grid = candidate_grid(("int",), (2, 3, 4, 8), (32,), (0,), symmetric=(True,))  # vLLM: int4, int8
    rng = np.random.default_rng(0)
    E = rng.random((len(names), len(grid))) * np.array([8.0, 4.0, 2.0, 1.0])  # fewer bits, larger error
    S = np.tile([200, 300, 400, 800], (len(names), 1)) + rng.integers(0, 3, (len(names), 1)) * 100
    table = ErrorTable(names, [(64, 64)] * len(names), grid, E, S)
    assert allowed_mask(table, Recipe())[1] == []  # untied by default
    for target in ("lowbit", "vllm"):
        allowed, tied = allowed_mask(table, Recipe(target=target, allocate=AllocateConfig(tie="type")))
        # vLLM runs q and k of a block as one matrix: with the types tied, all q and k take one candidate
        assert tied == ([[0, 1, 3, 4], [2, 5]] if target == "vllm" else [[0, 3], [1, 4], [2, 5]])
        lo, hi = int(np.where(allowed, S, 10**9).min(1).sum()), int(np.where(allowed, S, 0).max(1).sum())
        for budget in (lo, (lo + hi) // 2, hi - 150):
            a = allocate(E, S, budget, allowed=allowed, tied=tied)
            assert all(len(set(a.choice[g].tolist())) == 1 for g in tied)
            assert a.error == pytest.approx(brute_force(E, S, budget, allowed, tied), rel=1e-9)
    with pytest.raises(RecipeError, match="unknown allocate.tie 'block'"):
        AllocateConfig(tie="block")


def small_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(48, 64, generator=g), "b": torch.randn(64, 40, generator=g) * 0.1}


def test_error_table_properties():
    W = small_weights()
    grid = candidate_grid(("int", "nf"), (2, 3, 4), (32,), (0, 4, 16, 48))
    table = error_table(W, grid, "lqlora", iterations=5)
    E, S = table.errors.numpy(), table.sizes.numpy()
    for m, w in enumerate(W.values()):
        for c, cand in enumerate(grid):
            assert S[m, c] == storage_bits(cand.spec, w.shape) + cand.rank * sum(w.shape) * 32
            assert math.isinf(E[m, c]) == (cand.rank > min(w.shape))
    for m in range(2):
        for fmt in ("int", "nf"):
            for r in (0, 4, 16):  # more bits, smaller error, at a fixed rank
                cols = [grid.index(Candidate(QuantSpec(f"{fmt}{b}", 32), r)) for b in (2, 3, 4)]
                assert E[m, cols[0]] > E[m, cols[1]] > E[m, cols[2]]
            for b in (2, 3, 4):  # a higher rank, smaller error, at a fixed spec
                cols = [grid.index(Candidate(QuantSpec(f"{fmt}{b}", 32), r)) for r in (0, 4, 16)]
                assert E[m, cols[0]] > E[m, cols[1]] > E[m, cols[2]]
    assert table.params == 48 * 64 + 64 * 40
    alloc = table.allocate(3.5)
    assert alloc.bits <= budget_bits(3.5, table.params)
    assert set(table.plan(alloc)) == {"a", "b"}


def test_lorc_shared_work_matches_decompose():
    W = small_weights(1)["a"]
    H = (lambda X: X.T @ X)(torch.randn(128, 64, generator=torch.Generator().manual_seed(2)))
    grid = candidate_grid(("int",), (3,), (32,), (0, 4, 12))
    errs, sizes = error_row(W, grid, "lorc", stats=Stats(H=H), metric="output")
    for c, cand in enumerate(grid):
        d = decompose(W, cand.spec, cand.rank, "lorc", H=H)
        assert errs[c] == pytest.approx(d.info["output_error"], rel=1e-4)
    assert errs[0] > errs[1] > errs[2]


def test_error_row_rejects_missing_stats_and_marks_none_ranks():
    W = small_weights()["a"]
    grid = candidate_grid(("int",), (4,), (32,), (0, 8))
    with pytest.raises(AllocationError, match="needs the layer's H"):
        error_row(W, grid, "lorc", metric="output")
    with pytest.raises(AllocationError, match="unknown metric"):
        error_row(W, grid, "lorc", metric="l1")
    errs, _ = error_row(W, grid, "none")
    assert math.isfinite(errs[0]) and math.isinf(errs[1])
    with pytest.raises(AllocationError, match="layer 'a'"):
        error_table({"a": W}, grid, "svdquant")  # SVDQuant needs activation statistics


def test_error_table_save_load_round_trip(tmp_path):
    grid = candidate_grid(("int", "nf"), (2, 4), (32,), (0, 8, 64))
    table = error_table(small_weights(), grid, "lorc")
    path = tmp_path / "error_table.safetensors"
    table.save(path)
    back = ErrorTable.load(path)
    assert back.names == table.names and back.shapes == table.shapes and back.candidates == grid
    assert back.info == table.info and back.errors.dtype == torch.float64 and back.sizes.dtype == torch.int64
    assert torch.equal(back.errors, table.errors) and torch.equal(back.sizes, table.sizes)
    assert torch.isinf(back.errors).any()
    assert back.plan(back.allocate(3.0)) == table.plan(table.allocate(3.0))
    path.write_bytes(b"not a table")
    with pytest.raises(AllocationError, match="cannot read error table"):
        ErrorTable.load(path)
    none_for_a = np.ones(tuple(table.errors.shape), dtype=bool)
    none_for_a[0] = False
    with pytest.raises(AllocationError, match="layer 'a' has no allowed candidate"):
        table.allocate(3.0, allowed=none_for_a)
    assert table.allocate(3.0, solver="greedy").status == "greedy"
    with pytest.raises(AllocationError, match="unknown solver"):
        table.allocate(3.0, solver="gurobi")
