"""Peak memory of block-by-block calibration with the hidden states kept in memory or on disk past a limit.

Usage:
    python scripts/bench_hidden.py [--samples 4096] [--seq-len 128] [--hidden 64] [--layers 2]
        [--limits none,64MB,0] [--json]

Builds a random Llama of the given shape (fp32, the weights do not matter), runs
`lowbit.calibration.calibrate_sequential` over random token blocks with an `on_block` that changes each
block (so the next block sees modified outputs, as GPTQ's protocol does) once per limit, each in a
fresh subprocess, and prints its wall time and peak RSS (`resource.getrusage`, the process's maximum
resident set size) beside the size of the hidden states [S, L, D], and whether the statistics equal
those of the first run bit for bit (a digest of every Hessian).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time


def run_one(args: argparse.Namespace, limit: str) -> dict:
    """One calibration in this process; its measurements."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.calibration import calibrate_sequential
    from lowbit.nn.shards import parse_size

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=args.seq_len,
    )
    model = LlamaForCausalLM(config).eval()
    data = torch.randint(0, 1000, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))

    def halve(index, block, block_stats):
        block.mlp.down_proj.weight.data.mul_(0.5)

    offload = None if limit == "none" else (0 if limit == "0" else parse_size(limit))
    t0 = time.perf_counter()
    stats = calibrate_sequential(model, data, on_block=halve, offload_bytes=offload, progress=False)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256()
    for name in sorted(stats):
        digest.update(stats[name].hessian.numpy().tobytes())
    return {
        "limit": limit,
        "seconds": round(seconds, 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "hidden_bytes": args.samples * args.seq_len * args.hidden * 4,
        "hessians_sha256": digest.hexdigest(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--limits", default="none,64MB,0", help="comma-separated: none, a size such as 64MB, or 0")
    p.add_argument("--json", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one limit in this process
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args, args.one)))
        return
    rows = []
    for limit in args.limits.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", limit]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    for row in rows:
        row["same_as_first"] = row["hessians_sha256"] == rows[0]["hessians_sha256"]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"hidden states [S, L, D] fp32: {rows[0]['hidden_bytes'] / 1e6:.1f} MB")
    for row in rows:
        rss = row["peak_rss_bytes"] / 1e6
        print(f"limit {row['limit']:>6}: {row['seconds']:7.1f} s, peak RSS {rss:8.1f} MB, ", end="")
        print(f"same statistics: {row['same_as_first']}")


if __name__ == "__main__":
    main()
