"""Quality table: perplexity of the built-in model compressed by each method at 4, 3 and 2-bit settings.

Usage:
    python scripts/quality.py [--model smollm2-135m] [--data builtin:lee-news] [--samples 32]
        [--seq-len 512] [--eval-tokens N] [--eval SOURCE,...] [--awq KEY=VALUE,...] [--rotate KEY=VALUE,...]
        [--skip-original]
        [--only NAME[:SPEC],...] [--budgets B,...] [--budget-recipes PRESET,...] [--work-dir DIR]
        [--json results.json]

Each row: method, spec, rank, bits per weight of the quantized layers (codes, scales, zeros and low-rank
factors counted), perplexity on the held-out part of each --eval source (default: --data; the held-out
part is never seen by calibration), and wall time of the compression. AWQ rows (lowbit.compress.awq)
take the recipe's `scaling` section with the --awq overrides (e.g. `objective=layers,clip_grid=10`;
see `lowbit.compress.recipe.ScalingConfig`). --rotate gives every method row the recipe's `rotate`
section (e.g. `method=hadamard,heads=true,online_down=true`; see `lowbit.compress.recipe.RotateConfig`),
its name suffixed "+rot". --skip-original leaves out the uncompressed model's row. The
model
is loaded once and deep-copied for every row; one set of calibration blocks is shared by every row that
needs calibration. --budgets adds a row per budget and budget preset (`--budget-recipes`, default
the lowbit target's budget default above 3 bits, alloc-rot; `--only` with no method row runs them
alone), sharing one work area per preset so that the
budgets reuse one calibration and error table; each budget row's time is its own share (the first
includes the calibration and the table; --work-dir keeps the work areas there, reused by a later run).
A budget row calibrates on the first `calibration.samples` of the shared blocks (its recipe's count,
at most --samples): the windows its own recipe would draw.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import tempfile
import time

import yaml

from lowbit.calibration.data import calibration_blocks, eval_tokens
from lowbit.compress.api import compress
from lowbit.compress.presets import BUDGET_PRESET, resolve_recipe
from lowbit.compress.recipe import Recipe
from lowbit.eval.perplexity import dense_bits_per_weight, perplexity
from lowbit.models import load_model

AWQ = {"method": "awq"}

# (name, quantize section, decompose section[, scaling section])
ROWS = [
    ("rtn", {"format": "int4", "group_size": 128}, {}),
    ("gptq", {"format": "int4", "group_size": 128, "rounding": "gptq"}, {}),
    ("rtn", {"format": "int3", "group_size": 128}, {}),
    ("gptq", {"format": "int3", "group_size": 128, "rounding": "gptq"}, {}),
    ("gptq", {"format": "int4", "group_size": 32, "rounding": "gptq"}, {}),
    ("lorc", {"format": "int3", "group_size": 128}, {"method": "lorc", "rank": 32}),
    ("lqlora", {"format": "int3", "group_size": 128}, {"method": "lqlora", "rank": 32}),
    ("lqlora-fisher", {"format": "int3", "group_size": 128}, {"method": "lqlora-fisher", "rank": 32}),
    ("svdquant", {"format": "int3", "group_size": 128}, {"method": "svdquant", "rank": 32}),
    ("lorc+gptq", {"format": "int3", "group_size": 128, "rounding": "gptq"}, {"method": "lorc", "rank": 32}),
    (
        "lqlora+gptq",
        {"format": "int3", "group_size": 128, "rounding": "gptq"},
        {"method": "lqlora", "rank": 32},
    ),
    (
        "lqlora-fisher+gptq",
        {"format": "int3", "group_size": 128, "rounding": "gptq"},
        {"method": "lqlora-fisher", "rank": 32},
    ),
    (
        "svdquant+gptq",
        {"format": "int3", "group_size": 128, "rounding": "gptq"},
        {"method": "svdquant", "rank": 32},
    ),
    ("rtn", {"format": "int2", "group_size": 64}, {}),
    ("gptq", {"format": "int2", "group_size": 64, "rounding": "gptq"}, {}),
    ("gptq", {"format": "int2", "group_size": 32, "rounding": "gptq"}, {}),
    (
        "lqlora+gptq",
        {"format": "int2", "group_size": 64, "rounding": "gptq"},
        {"method": "lqlora", "rank": 32},
    ),
    ("gptq", {"format": "int3", "group_size": 64, "rounding": "gptq"}, {}),
    ("gptq", {"format": "int3", "group_size": 32, "rounding": "gptq"}, {}),
    # GPTQ's ablations (lowbit.lowrank.ROUNDINGS): without the clipped static scales, and the reference
    # algorithm without act-order
    *(
        (rounding, {"format": "int3", "group_size": g, "rounding": rounding}, {})
        for rounding in ("gptq-noclip", "gptq-plain")
        for g in (128, 64)
    ),
    ("awq", {"format": "int4", "group_size": 128}, {}, AWQ),
    ("awq+gptq", {"format": "int4", "group_size": 128, "rounding": "gptq"}, {}, AWQ),
    ("awq", {"format": "int3", "group_size": 128}, {}, AWQ),
    ("awq+gptq", {"format": "int3", "group_size": 128, "rounding": "gptq"}, {}, AWQ),
    ("awq-noclip", {"format": "int3", "group_size": 128}, {}, {**AWQ, "clip": False}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="builtin:lee-news")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=None)
    p.add_argument("--eval", default=None, help="comma-separated held-out text sources (default: --data)")
    p.add_argument("--awq", default="", help="overrides of the AWQ rows' scaling section: KEY=VALUE,...")
    p.add_argument("--rotate", default="", help="the method rows' rotate section: KEY=VALUE,...")
    p.add_argument("--skip-original", action="store_true")
    p.add_argument(
        "--only", default=None, help="comma-separated rows to run: method, or method:spec (gptq:int2-g64)"
    )
    p.add_argument("--budgets", default="", help="comma-separated bits-per-weight budgets")
    p.add_argument("--budget-recipes", default=BUDGET_PRESET, help="comma-separated budget presets")
    p.add_argument("--work-dir", default=None, help="work areas of the budget rows (default: temporary)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    known = {"none"} | {n for n, *_ in ROWS}
    known |= {f"{n}:{Recipe.from_dict({'quantize': q}).quantize.spec().short()}" for n, q, *_ in ROWS}
    unknown = sorted(set(args.only.split(",")) - known) if args.only else []
    if unknown:  # a misspelt row would otherwise run nothing and say nothing
        p.error(f"--only: no row {', '.join(unknown)}; the rows: {', '.join(sorted(known))}")

    base, tok = load_model(args.model)
    sources = args.eval.split(",") if args.eval else [args.data]
    ids = {src: eval_tokens(tok, src, max_tokens=args.eval_tokens) for src in sources}
    blocks = calibration_blocks(tok, args.data, args.samples, args.seq_len, seed=0)

    def perplexities(model) -> dict[str, float]:
        return {src: perplexity(model, t, progress=False)["perplexity"] for src, t in ids.items()}

    awq, rotate = (
        {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.split(",") if kv)}
        for a in (args.awq, args.rotate)
    )
    ppl = {src: float("nan") for src in sources} if args.skip_original else perplexities(base)
    rows = [
        dict(method="original", spec="fp32", rank=0, bpw=dense_bits_per_weight(base), ppl=ppl, seconds=0.0)
    ]
    heads = " ".join(f"{'ppl ' + src.removeprefix('builtin:'):>18}" for src in sources)
    print(f"{'method':<16} {'spec':<14} {'rank':>4} {'bpw':>6} {heads} {'time s':>7}", flush=True)
    cells = " ".join(f"{v:>18.3f}" for v in ppl.values())
    print(f"{'original':<16} {'fp32':<14} {0:>4} {rows[0]['bpw']:>6.2f} {cells} {0:>7}", flush=True)
    only = set(args.only.split(",")) if args.only else None
    for name, quant, dec, *scaling in ROWS:
        spec = Recipe.from_dict({"quantize": quant}).quantize.spec().short()
        if only and name not in only and f"{name}:{spec}" not in only:
            continue
        recipe = Recipe.from_dict(
            {
                "quantize": quant,
                "decompose": dec,
                "calibration": {"data": args.data, "samples": args.samples, "seq_len": args.seq_len},
                "scaling": {**scaling[0], **awq} if scaling else {},
                "rotate": rotate,
            }
        )
        name = f"{name}+rot" if rotate else name
        t0 = time.perf_counter()
        model, report = compress(
            copy.deepcopy(base), recipe, tokenizer=tok, calib_data=blocks, progress=False
        )
        seconds = time.perf_counter() - t0
        ppl = perplexities(model)
        row = dict(
            method=name,
            spec=spec,
            rank=recipe.decompose.rank,
            bpw=report.bits_per_weight,
            ppl=ppl,
            seconds=round(seconds, 1),
        )
        rows.append(row)
        cells = " ".join(f"{v:>18.3f}" for v in ppl.values())
        print(f"{name:<16} {spec:<14} {row['rank']:>4} {row['bpw']:>6.2f} {cells} {row['seconds']:>7}")
        del model
    for name in args.budget_recipes.split(",") if args.budgets else ():
        samples = resolve_recipe(name).calibration.samples
        if samples > len(blocks):
            p.error(f"{name} calibrates on {samples} samples: give --samples {samples} or more")
        with (
            contextlib.nullcontext(args.work_dir) if args.work_dir else tempfile.TemporaryDirectory() as work
        ):
            for b in (float(b) for b in args.budgets.split(",")):
                t0 = time.perf_counter()
                model, report = compress(
                    copy.deepcopy(base),
                    name,
                    budget=b,
                    tokenizer=tok,
                    calib_data=blocks[:samples],
                    work_dir=work,
                    keep_work=True,  # the next budget reuses the calibration and error table
                    progress=False,
                )
                seconds = round(time.perf_counter() - t0, 1)
                ppl = perplexities(model)
                r = report.budgets[0]
                row = dict(
                    method=f"{name}@{b:g}",
                    spec="allocated",
                    rank=0,
                    bpw=report.bits_per_weight,
                    ppl=ppl,
                    seconds=seconds,
                    fallback=r.get("fallback"),
                    losses=r.get("losses"),
                )
                rows.append(row)
                cells = " ".join(f"{v:>18.3f}" for v in ppl.values())
                spec = r.get("fallback") or "allocated"
                print(
                    f"{row['method']:<16} {spec:<14} {0:>4} {row['bpw']:>6.2f} {cells} {seconds:>7}",
                    flush=True,
                )
                del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "model": args.model,
                    "data": args.data,
                    "eval_tokens": {src: len(t) for src, t in ids.items()},
                    "awq": awq,
                    "rotate": rotate,
                    "samples": args.samples,
                    "seq_len": args.seq_len,
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
