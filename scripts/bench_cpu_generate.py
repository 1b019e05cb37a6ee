"""Generation speed of the built-in model on the CPU with every linear layer of its decoder blocks as
QLinear (reference backend): tokens per second, dequantizing per call against a kept dequantized weight.

Usage:
    python scripts/bench_cpu_generate.py                       # smollm2-135m, int4-g128, 16 new tokens
    python scripts/bench_cpu_generate.py --format nf4 --group 64 --rank 16 --new-tokens 64 --threads 2

The model is `smollm2-135m` (float32); every nn.Linear of its decoder blocks is quantized round-to-nearest
(`lowbit.quantize`) and swapped for a QLinear (rank > 0 adds random low-rank factors of that rank, to
time the branch). Greedy `generate` of --new-tokens tokens from a short prompt is timed once per mode
after a two-token warm-up and reported as tokens per second:

    per call     the reference dequantizes the weight in every forward (the default);
    kept         `lowbit.kernels.prepared.keep_dequantized(model)`: each layer keeps its dequantized
                 weight between calls (float32 here: 4 bytes per weight in memory, speed over memory).

Both modes produce the same tokens (checked). A dense float32 model is timed as the reference point.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--format", default="int4")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p.parse_args(argv)


def quantize_blocks(model: torch.nn.Module, spec, rank: int) -> int:
    """Swap every nn.Linear inside the decoder blocks for a QLinear; returns how many."""
    from lowbit.nn.qlinear import QLinear, set_submodule
    from lowbit.quantizers import quantize

    g = torch.Generator().manual_seed(0)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    for name in names:
        lin = model.get_submodule(name)
        n, k = lin.weight.shape
        l1 = 0.01 * torch.randn(n, rank, generator=g) if rank else None
        l2 = 0.01 * torch.randn(rank, k, generator=g) if rank else None
        set_submodule(model, name, QLinear.from_linear(lin, quantize(lin.weight.data, spec), l1, l2))
    return len(names)


def tokens_per_second(model, ids, new_tokens: int) -> tuple[float, torch.Tensor]:
    """A timed greedy generation after a 2-token warm-up: (tokens/s, generated ids)."""
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return new_tokens / (time.perf_counter() - t0), out


def main(argv: list[str] | None = None) -> int:
    from lowbit.kernels.prepared import keep_dequantized
    from lowbit.models import load_model
    from lowbit.quantizers import QuantSpec

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    model.eval()
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    dense, _ = tokens_per_second(model, ids, args.new_tokens)
    print(f"dense float32     {dense:7.1f} tokens/s", flush=True)
    spec = QuantSpec(args.format, args.group)
    layers = quantize_blocks(model, spec, args.rank)
    print(f"{args.model}, {layers} QLinear layers {spec.short()} rank {args.rank}, {args.threads} threads, "
          f"{args.new_tokens} new tokens", flush=True)  # fmt: skip
    per_call, out_a = tokens_per_second(model, ids, args.new_tokens)
    print(f"per call          {per_call:7.1f} tokens/s", flush=True)
    keep_dequantized(model)
    kept, out_b = tokens_per_second(model, ids, args.new_tokens)
    same = torch.equal(out_a, out_b)
    print(f"kept dequantized  {kept:7.1f} tokens/s   same tokens: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
