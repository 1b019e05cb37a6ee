"""Bit allocation benchmark: the ILP (CBC) against the Lagrangian + greedy baseline on a 7B-size table.

Usage:
    python scripts/bench_allocate.py [--budgets 2.5,3,3.5,4,5] [--seeds 3] [--time-limit 6]

The table is synthetic but shaped like Llama-7B: 32 layers x 7 matrices (q, k, v, o: 4096 x 4096;
gate, up: 11008 x 4096; down: 4096 x 11008) = 224 matrices. Two candidate grids: the default one
(int2/3/4/8, nf2/3/4; group sizes 32, 64, 128; ranks 0, 8, 16, 32, 64: 105 candidates) and a coarse
one (int2/3/4/8, group size 128, rank 0: 4 candidates), whose few large steps leave the greedy baseline
more to lose. Sizes are the exact stored bits (fp16 low-rank factors); errors follow random convex-ish
curves: a per-matrix sensitivity times 4^-bits, a mild group-size penalty, a per-matrix gain from the
rank, and 5% noise.
Each row: budget in bits per weight, total error of the ILP and of the greedy baseline, the ILP's gain
(relative error reduction), both solve times and the ILP's status.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from lowbit.compress.allocate import allocate, allocate_greedy, budget_bits, candidate_bits, candidate_grid

LLAMA_7B_LAYER = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


def synthetic_table(shapes, candidates, seed: int = 0, lowrank_dtype_bits: int = 16):
    """(errors float64 [M, C], sizes int64 [M, C]) for matrices of `shapes` under `candidates`."""
    rng = np.random.default_rng(seed)
    sizes = np.array([[candidate_bits(c, s, lowrank_dtype_bits) for c in candidates] for s in shapes])
    M = len(shapes)
    sensitivity = rng.lognormal(0.0, 1.0, M)  # [M]
    rank_gain = rng.uniform(0.1, 0.6, M)  # [M] share of the error the low-rank part can remove
    bits = np.array([c.spec.bits for c in candidates])  # [C]
    group = np.array([c.spec.group_size or 4096 for c in candidates])  # [C]
    nf = np.array([0.85 if c.spec.kind == "nf" else 1.0 for c in candidates])  # [C]
    rank = np.array([c.rank for c in candidates])  # [C]
    quant = 4.0 ** (-bits) * (1.0 + 0.3 * np.log2(group / 32)) * nf  # [C]
    lowrank = 1.0 - rank_gain[:, None] * (1.0 - np.exp(-rank[None, :] / 32.0))  # [M, C]
    noise = rng.lognormal(0.0, 0.05, (M, len(candidates)))
    return sensitivity[:, None] * quant[None, :] * lowrank * noise, sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="2.5,3,3.5,4,5", help="bits per weight, comma-separated")
    ap.add_argument("--seeds", type=int, default=3, help="synthetic tables per budget")
    ap.add_argument(
        "--time-limit", type=float, default=6.0, help="wall-time limit of one ILP allocation, seconds"
    )
    args = ap.parse_args()
    shapes = LLAMA_7B_LAYER * 32
    print(f"{len(shapes)} matrices of Llama-7B shapes, {sum(n * k for n, k in shapes) / 1e9:.2f}B weights")
    grids = {"default": candidate_grid(), "coarse": candidate_grid(("int",), (2, 3, 4, 8), (128,), (0,))}
    for name, candidates in grids.items():
        print(f"\n{name} grid: {len(shapes)} matrices x {len(candidates)} candidates")
        run(shapes, candidates, [float(b) for b in args.budgets.split(",")], args.seeds, args.time_limit)


def run(shapes, candidates, budgets: list[float], seeds: int, time_limit: float) -> None:
    params = sum(n * k for n, k in shapes)
    header = f"{'bpw':>5} {'seed':>4} {'ILP error':>12} {'greedy error':>12} {'gain':>8} {'ILP s':>6}"
    print(header + f" {'greedy s':>8}  status")
    for bpw in budgets:
        for seed in range(seeds):
            E, S = synthetic_table(shapes, candidates, seed)
            B = budget_bits(bpw, params)
            ilp = allocate(E, S, B, params=params, time_limit=time_limit)
            gr = allocate_greedy(E, S, B, params=params)
            gain = (gr.error - ilp.error) / gr.error if gr.error > 0 else 0.0
            assert ilp.bits <= B and gr.bits <= B and math.isfinite(ilp.error)
            print(
                f"{bpw:5.2f} {seed:4d} {ilp.error:12.6g} {gr.error:12.6g} {gain:8.3%} {ilp.seconds:6.2f}"
                f" {gr.seconds:8.3f}  {ilp.status}"
            )


if __name__ == "__main__":
    main()
