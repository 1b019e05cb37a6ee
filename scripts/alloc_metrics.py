"""Which error metric makes the ILP allocation good: held-out perplexity of the built-in model allocated
by each metric at each budget.

Usage:
    python scripts/alloc_metrics.py [--budgets 3.25,3.0] [--metrics output,fisher] [--rounding nearest]
        [--final-rounding gptq] [--samples 32] [--seq-len 512] [--json results.json]

One calibration (input Hessians and the Fisher diagonal of --samples blocks of `builtin:lee-news`), one
error table per metric over the `alloc-int` grid (int2/3/4, groups 64 and 128, LoRC ranks 0 and 8,
errors measured with --rounding), then for every (metric, budget) the ILP's plan is applied to a copy of
the model: each layer's weight becomes Q + L1 L2 with Q rounded by --final-rounding, and its perplexity
measured on the held-out part of the text. Metrics: "output" tr(D H D^T), "fisher" sum(F * D^2),
"relative-output" tr(D H D^T) / tr(W H W^T).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np

from lowbit.calibration import calibrate
from lowbit.calibration.data import calibration_blocks, eval_tokens
from lowbit.compress.allocate import ErrorTable, candidate_bits, candidate_grid
from lowbit.compress.presets import preset
from lowbit.eval.perplexity import perplexity
from lowbit.lowrank.decomposition import quantize_step
from lowbit.lowrank.svd import svd_r
from lowbit.models import load_model
from lowbit.quantizers import dequantize

DATA = "builtin:lee-news"
METRICS = ("output", "fisher", "relative-output")


def lorc_residuals(W, spec, H, rounding, ranks):
    """{rank: W - (Q + L1 L2)} of LoRC at every rank, from one quantization and one SVD."""
    D = W - dequantize(quantize_step(W, spec, rounding, H))
    L1, L2 = svd_r(D, max(ranks))
    return {r: D - L1[:, :r] @ L2[:r] for r in ranks}


def metric_errors(D, W, H, F) -> dict[str, float]:
    out = float(((D @ H) * D).sum())
    return {
        "output": out,
        "fisher": float((F * D.square()).sum()),
        "relative-output": out / float(((W @ H) * W).sum()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="3.25,3.0")
    p.add_argument("--metrics", default="output,fisher")
    p.add_argument("--rounding", default="nearest", help="rounding of the error table")
    p.add_argument("--final-rounding", default="gptq", help="rounding of the allocated layers")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    model, tok = load_model("smollm2-135m")
    recipe = preset("alloc-int")
    a = recipe.allocate
    grid = candidate_grid(a.formats, a.bits, a.group_sizes, a.ranks, base=recipe.quantize.spec())
    blocks = calibration_blocks(tok, DATA, args.samples, args.seq_len, seed=0)
    t0 = time.perf_counter()
    cal = calibrate(model, blocks, stats=("hessian", "fisher"), progress=False)
    print(f"calibration {time.perf_counter() - t0:.0f} s", flush=True)
    names = list(cal.layers)
    E = {m: np.full((len(names), len(grid)), np.inf) for m in METRICS}
    S = np.zeros((len(names), len(grid)), dtype=np.int64)
    for i, name in enumerate(names):
        W = model.get_submodule(name).weight.detach().float()
        H, F = cal.layers[name].hessian_matrix().float(), cal.layers[name].fisher.float()
        for spec in dict.fromkeys(c.spec for c in grid):
            res = lorc_residuals(W, spec, H, args.rounding, sorted({c.rank for c in grid}))
            for j, c in enumerate(grid):
                if c.spec == spec:
                    S[i, j] = candidate_bits(c, tuple(W.shape), 16)
                    for m, e in metric_errors(res[c.rank], W, H, F).items():
                        E[m][i, j] = e
    ids = eval_tokens(tok, DATA)
    rows = []
    for metric in args.metrics.split(","):
        table = ErrorTable(
            names, [tuple(model.get_submodule(n).weight.shape) for n in names], grid, E[metric], S
        )
        for budget in map(float, args.budgets.split(",")):
            plan = table.plan(table.allocate(budget))
            net = copy.deepcopy(model)
            for name, c in plan.items():
                lin = net.get_submodule(name)
                W, H = lin.weight.detach().float(), cal.layers[name].hessian_matrix().float()
                res = lorc_residuals(W, c.spec, H, args.final_rounding, [c.rank])[c.rank]
                lin.weight.data = (W - res).to(lin.weight.dtype)
            bits = sum(int(S[i, grid.index(plan[n])]) for i, n in enumerate(names))
            row = dict(metric=metric, budget=budget, bits_per_weight=bits / table.params)
            row["perplexity"] = perplexity(net, ids, progress=False)["perplexity"]
            rows.append(row)
            print(
                f"{metric:<16} {budget:>5} {row['bits_per_weight']:.3f} bpw  ppl {row['perplexity']:.3f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
