"""Fine-tuning recovery: held-out perplexity of a compressed model before and after each fine-tuning mode.

Usage:
    python scripts/finetune_quality.py [--model smollm2-135m] [--preset int3-g128] [--method lqlora]
        [--rank 16] [--budget 3.0] [--modes lora,peqa,l4q,lsq] [--steps 100] [--batch-size 4]
        [--seq-len 256] [--samples 64] [--lr 1e-4] [--scale-lr 1e-5] [--lora-rank 16] [--adapter-rank 8]
        [--latent compressed] [--eval-tokens 20000]
        [--data builtin:lee-news] [--compressed DIR] [--json results.json]

The model is compressed once with --preset (its decompose section replaced by --method / --rank when
--rank > 0, e.g. LQ-LoRA rank 16; with --budget, allocated over the preset's candidate grid to that many
bits per weight, e.g. --preset alloc-int --budget 2.5; with --compressed DIR, saved there as a checkpoint,
or loaded from it when DIR already holds one, so that later runs skip the compression), then every mode
fine-tunes a copy for --steps steps with the distill objective (KL to the original model) on --samples
calibration blocks of --data.
Rows: mode, steps run, bits per weight of the quantized layers after fine-tuning (l4q merges its adapters:
rank 0), perplexity on the held-out part of --data (never trained on), wall time, time per step
and peak memory (the process's peak RSS on CPU: it includes the original model kept as the teacher).
lora trains the existing low-rank factors and gives the layers without any new ones of --adapter-rank
(QLoRA); their bits count in its row.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace

from lowbit.calibration.data import calibration_blocks, eval_tokens
from lowbit.compress.api import compress
from lowbit.compress.finetune import FinetuneConfig, finetune
from lowbit.compress.presets import preset
from lowbit.compress.recipe import DecomposeConfig
from lowbit.eval.perplexity import dense_bits_per_weight, perplexity
from lowbit.models import load_model
from lowbit.nn.checkpoint import load, plan_bits
from lowbit.nn.manifest import is_checkpoint, read_manifest


def row_line(r: dict) -> str:
    return (
        f"{r['mode']:<10} {r['steps']:>5} {r['bpw']:>6.2f} {r['ppl']:>9.3f} {r['seconds']:>8.1f} "
        f"{r['s_per_step']:>7.2f} {r['peak_mb']:>8}"
    )


def quantized_params(plan: dict) -> int:
    return sum(e["shape"][0] * e["shape"][1] for e in plan.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--preset", default="int3-g128")
    p.add_argument("--method", default="lqlora", help="decomposition used when --rank > 0")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--budget", type=float, default=None, help="bits per weight for an allocating preset")
    p.add_argument("--modes", default="lora,peqa,l4q,lsq")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--scale-lr", type=float, default=1e-5)
    p.add_argument("--lora-rank", type=int, default=16, help="adapter rank of l4q")
    p.add_argument("--adapter-rank", type=int, default=8, help="lora: rank of new factors where none exist")
    p.add_argument("--latent", default="compressed", help="how l4q and lsq start: compressed or original")
    p.add_argument("--eval-tokens", type=int, default=20000)
    p.add_argument("--data", default="builtin:lee-news")
    p.add_argument("--compressed", default=None, help="checkpoint folder of the compressed model")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()

    base, tok = load_model(args.model)
    recipe = preset(args.preset)
    if args.rank:
        recipe = replace(recipe, decompose=DecomposeConfig(method=args.method, rank=args.rank))
    ids = eval_tokens(tok, args.data, max_tokens=args.eval_tokens)
    blocks = calibration_blocks(tok, args.data, args.samples, args.seq_len, seed=0)
    how = f"{args.preset} rank {args.rank}" + ("" if args.budget is None else f" budget {args.budget:g}")
    t0 = time.perf_counter()
    if args.compressed and is_checkpoint(args.compressed):
        student = load(args.compressed)
        plan = read_manifest(args.compressed)["layers"]
        compressed_bpw = plan_bits(student, plan) / quantized_params(plan)
        print(f"loaded the compressed model from {args.compressed} (not checked against {how})", flush=True)
    else:
        student, report = compress(
            copy.deepcopy(base),
            recipe,
            args.compressed,
            budget=args.budget,
            tokenizer=tok,
            calib_data=blocks,
            progress=False,
        )
        compressed_bpw = report.bits_per_weight
        print(f"compressed with {how} in {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"{'mode':<10} {'steps':>5} {'bpw':>6} {'ppl':>9} {'time s':>8} {'s/step':>7} {'peak MB':>8}")
    rows = [
        dict(
            mode="original", steps=0, bpw=dense_bits_per_weight(base), seconds=0.0, s_per_step=0.0, peak_mb=0
        ),
        dict(mode="compressed", steps=0, bpw=compressed_bpw, seconds=0.0, s_per_step=0.0, peak_mb=0),
    ]
    for row, model in zip(rows, (base, student), strict=True):
        row["ppl"] = perplexity(model, ids, seq_len=args.seq_len, progress=False)["perplexity"]
        print(row_line(row), flush=True)
    for mode in filter(None, args.modes.split(",")):
        config = FinetuneConfig(
            mode=mode,
            objective="distill",
            steps=args.steps,
            lr=args.lr,
            scale_lr=args.scale_lr,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            rank=args.lora_rank,
            adapter_rank=args.adapter_rank,
            latent=args.latent,
            warmup=min(10, args.steps // 10),
            eval_blocks=min(4, args.samples // 8),
            eval_every=max(1, args.steps // 4),
        )
        model = copy.deepcopy(student)
        ft = finetune(model, base, config=config, blocks=blocks, progress=False)
        row = dict(
            mode=mode,
            steps=ft.steps,
            bpw=plan_bits(model, ft.plan) / quantized_params(ft.plan),
            ppl=perplexity(model, ids, seq_len=args.seq_len, progress=False)["perplexity"],
            seconds=round(ft.seconds, 1),
            s_per_step=round(ft.seconds_per_step, 2),
            peak_mb=ft.peak_memory_bytes >> 20,
        )
        rows.append(row)
        print(row_line(row), flush=True)
        del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "eval_tokens": len(ids), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
