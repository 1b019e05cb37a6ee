"""Where a uniform spec loses perplexity: the compressed model with one group of layers put back in float.

Usage:
    python scripts/layer_sensitivity.py [--spec int4] [--group-size 128] [--samples 16] [--tokens 8192]
        [--eval builtin:bible] [--by type,block] [--json out.json]

The built-in model is compressed with GPTQ at one spec for every layer, with every rotation (residual
stream, value heads, online down_proj; `lowbit.compress.rotation`), calibrated on --samples blocks of
512 tokens of `builtin:lee-news`. The same rotations folded into a float copy give the reference (its
perplexity is the original's up to float rounding). Each row then evaluates the compressed model with
one group of its layers replaced by their rotated float originals: every layer of one type (q_proj,
..., down_proj) with `--by type`, every layer of one decoder block with `--by block`. A group's
recovery (compressed perplexity minus the row's) is the damage its quantization does with all the
other layers quantized; the recoveries of disjoint groups add up to about the whole gap when the
damage is additive.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from lowbit.calibration.data import calibration_blocks, eval_tokens
from lowbit.compress.api import compress
from lowbit.compress.recipe import Recipe
from lowbit.compress.rotation import rotate_model
from lowbit.compress.uniform import selected_names
from lowbit.eval.perplexity import perplexity
from lowbit.models import load_model

ROTATE = {"method": "hadamard", "heads": True, "online_down": True}


def with_float(quantized, reference, names):
    """A copy of `quantized` with the layers `names` taken from `reference`."""
    model = copy.deepcopy(quantized)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, copy.deepcopy(reference.get_submodule(name)))
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="int4")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--eval", default="builtin:bible")
    p.add_argument("--by", default="type,block", help="comma-separated: type, block")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    base, tok = load_model("smollm2-135m")
    ids = eval_tokens(tok, args.eval, max_tokens=args.tokens)
    blocks = calibration_blocks(tok, "builtin:lee-news", args.samples, 512, seed=0)
    recipe = Recipe.from_dict(
        {
            "quantize": {"format": args.spec, "group_size": args.group_size, "rounding": "gptq"},
            "calibration": {"samples": args.samples, "seq_len": 512},
            "rotate": ROTATE,
        }
    )
    names = selected_names(base, recipe)
    reference = copy.deepcopy(base)
    rotate_model(reference, recipe.rotate, names)
    t0 = time.perf_counter()
    quantized, report = compress(
        copy.deepcopy(base), recipe, tokenizer=tok, calib_data=blocks, progress=False
    )
    print(f"compressed in {time.perf_counter() - t0:.1f} s, {report.bits_per_weight:.3f} bits per weight")

    def ppl(model) -> float:
        return perplexity(model, ids, progress=False)["perplexity"]

    rows = {"float (rotated)": ppl(reference), "compressed": ppl(quantized)}
    for key, value in rows.items():
        print(f"{key:<24} {value:10.3f}", flush=True)
    groups = {}
    if "type" in args.by.split(","):
        for kind in sorted({n.rsplit(".", 1)[1] for n in names}):
            groups[f"float {kind}"] = [n for n in names if n.endswith("." + kind)]
    if "block" in args.by.split(","):
        for i in sorted({int(n.split(".")[2]) for n in names}):
            groups[f"float block {i}"] = [n for n in names if n.split(".")[2] == str(i)]
    for key, group in groups.items():
        rows[key] = ppl(with_float(quantized, reference, group))
        print(f"{key:<24} {rows[key]:10.3f}  recovery {rows['compressed'] - rows[key]:7.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"spec": args.spec, "group_size": args.group_size, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
