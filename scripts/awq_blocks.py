"""Block-output error of the built-in model's first decoder blocks under each rounding / scaling, on
held-out text: a quick, real-weight check of activation-aware scaling where a perplexity run is too long.

Usage:
    python scripts/awq_blocks.py [--model smollm2-135m] [--data builtin:lee-news] [--eval SOURCE] [--blocks 4]
        [--samples 8] [--seq-len 512] [--eval-tokens 4096] [--specs int3-g128,int4-g128]
        [--only rtn,gptq,awq,awq+gptq] [--awq KEY=VALUE,...] [--json out.json]

The model is cut to its first --blocks decoder blocks and compressed by the pipeline itself
(`quantize_model`, calibration blocks from the calibration part of --data, each block calibrated on the
outputs of the already-compressed blocks before it). The error is ||h_q - h||^2 / ||h||^2 at the output
of the last kept block on the held-out part of --eval (default --data; --eval-tokens tokens in --seq-len
windows), h from the uncompressed model.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import yaml

from lowbit.calibration.data import calibration_blocks, eval_tokens
from lowbit.compress.recipe import Recipe
from lowbit.compress.uniform import quantize_model
from lowbit.models import load_model

METHODS = {
    "rtn": ({}, {}),
    "gptq": ({"rounding": "gptq"}, {}),
    "awq": ({}, {"method": "awq"}),
    "awq+gptq": ({"rounding": "gptq"}, {"method": "awq"}),
}


@torch.no_grad()
def last_block_output(model, ids: torch.Tensor) -> torch.Tensor:
    """The hidden states [S, L, D] leaving the model's last decoder block on ids [S, L]."""
    out = []
    hook = model.model.layers[-1].register_forward_hook(
        lambda _, a, o: out.append(o[0] if isinstance(o, tuple) else o)
    )
    try:
        model(ids)
    finally:
        hook.remove()
    return out[0].float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="builtin:lee-news")
    p.add_argument("--eval", default=None, help="held-out text source (default: --data)")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--specs", default="int3-g128,int4-g128")
    p.add_argument("--only", default=",".join(METHODS))
    p.add_argument("--awq", default="", help="overrides of the scaling section: KEY=VALUE,...")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    model, tok = load_model(args.model)
    model.model.layers = model.model.layers[: args.blocks]
    model.config.num_hidden_layers = args.blocks
    ids = eval_tokens(tok, args.eval or args.data, max_tokens=args.eval_tokens)
    ids = ids[: ids.numel() // args.seq_len * args.seq_len].view(-1, args.seq_len)
    blocks = calibration_blocks(tok, args.data, args.samples, args.seq_len, seed=0)
    ref = last_block_output(model, ids)
    awq = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.awq.split(",") if kv)}
    rows = []
    print(f"{'method':<10} {'spec':<10} {'rel. error':>11} {'time s':>7}", flush=True)
    for spec in args.specs.split(","):
        fmt, group = spec.split("-g")
        for name in args.only.split(","):
            quant, scaling = METHODS[name]
            recipe = Recipe.from_dict(
                {
                    "quantize": {"format": fmt, "group_size": int(group), **quant},
                    "scaling": {**scaling, **awq} if scaling else {},
                }
            )
            q = copy.deepcopy(model)
            t0 = time.perf_counter()
            quantize_model(q, recipe, calib_data=blocks, progress=False)
            seconds = round(time.perf_counter() - t0, 1)
            err = float((last_block_output(q, ids) - ref).square().sum() / ref.square().sum())
            rows.append(dict(method=name, spec=spec, error=err, seconds=seconds))
            print(f"{name:<10} {spec:<10} {err:>11.5f} {seconds:>7}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**vars(args), "awq": awq, "eval_tokens": ids.numel(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
