"""Peak resident memory of GPTQ on one layer, phase by phase (Llama-3-8B's down_proj by default).

Usage:
    OMP_NUM_THREADS=1 python scripts/bench_gptq_memory.py [--n 4096] [--k 14336] [--tokens 256]
        [--alive K2] [--decompose] [--json]

Builds the input Hessian of `--tokens` random input rows (H = X^T X, fp32 [K, K], as
`lowbit.calibration.stats.LayerStats` sums it), normalises it as the compress path does
(`LayerStats.hessian_matrix`), then runs `lowbit.quantizers.gptq.gptq` (int4, groups of 128, symmetric)
on a random W [N, K]. `--decompose` runs the compress path's step instead: `lowbit.lowrank.decompose`
(GPTQ, then the reconstruction errors it reports) on a bf16 W, as `lowbit.compress.plan.apply_choice`
passes the layer's weight; `--alive K2` holds another fp32 [K2, K2] Hessian meanwhile (Llama-3-8B's
gate/up_proj, K=4096 N=14336, are built while down_proj's 14336 x 14336 one is alive). A thread samples
the process's resident set size (/proc/self/statm) every 10 ms; each phase prints the largest RSS seen
during it, the increase over the RSS before it, and both in units of one fp32 [K, K] matrix. The
numbers measure memory only: the weights are random.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import threading
import time

import torch

from lowbit.calibration.stats import LayerStats
from lowbit.lowrank import decompose
from lowbit.quantizers import QuantSpec
from lowbit.quantizers.gptq import gptq


class RssSampler(threading.Thread):
    """Samples this process's RSS every `period` seconds; `peak()` returns the largest since `reset()`."""

    def __init__(self, period: float = 0.01):
        super().__init__(daemon=True)
        self.period, self.page = period, os.sysconf("SC_PAGE_SIZE")
        self.stop, self.top = threading.Event(), 0

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def reset(self) -> int:
        self.top = self.rss()
        return self.top

    def peak(self) -> int:
        self.top = max(self.top, self.rss())
        return self.top

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak()
            self.stop.wait(self.period)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="output features N of W [N, K]")
    p.add_argument("--k", type=int, default=14336, help="input features K (the Hessian is [K, K])")
    p.add_argument("--tokens", type=int, default=256, help="calibration rows folded into the Hessian")
    p.add_argument("--alive", type=int, default=0, help="size of another [K2, K2] Hessian held meanwhile")
    p.add_argument("--decompose", action="store_true", help="decompose (GPTQ + its errors), as compress does")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    sampler = RssSampler()
    sampler.start()
    phases, unit = [], 4 * args.k * args.k

    def phase(name: str, fn):
        before = sampler.reset()
        t0 = time.perf_counter()
        out = fn()
        peak = sampler.peak()
        phases.append(dict(phase=name, seconds=time.perf_counter() - t0, before=before, peak=peak))
        return out

    other = torch.ones(args.alive, args.alive)  # noqa: F841  (held, as the compress path holds it)
    stats = LayerStats()
    x = torch.randn(args.tokens, args.k, generator=gen)  # [tokens, K]
    phase("hessian (X^T X)", functools.partial(stats.update, x, ("hessian",)))
    del x
    H = phase("normalise (2/n X^T X)", stats.hessian_matrix)
    W = torch.randn(args.n, args.k, generator=gen) * 0.02  # [N, K]
    spec = QuantSpec("int4", 128, symmetric=True)
    if args.decompose:
        W = W.bfloat16()  # the layer's weight, passed as `apply_choice` passes it
        phase("decompose (gptq, errors)", lambda: decompose(W, spec, 0, "none", H=H, rounding="gptq"))
    else:
        phase("gptq", lambda: gptq(W, H, spec))
    sampler.stop.set()
    if args.json:
        print(json.dumps(dict(n=args.n, k=args.k, tokens=args.tokens, kk_bytes=unit, phases=phases)))
        return
    print(f"W [{args.n}, {args.k}], H [{args.k}, {args.k}] fp32 = {unit / 1e9:.3f} GB (one 'KK' below)")
    for r in phases:
        grow = r["peak"] - r["before"]
        print(
            f"{r['phase']:<24} {r['seconds']:8.1f} s  peak RSS {r['peak'] / 1e9:6.2f} GB "
            f"(+{grow / 1e9:.2f} GB = {grow / unit:.2f} KK over the {r['before'] / 1e9:.2f} GB before)"
        )


if __name__ == "__main__":
    main()
