"""Kernel speed: the Triton quantized linear against a bf16 matmul, on one CUDA GPU.

Usage:
    python scripts/bench_kernels.py
    python scripts/bench_kernels.py --shapes 4096x4096 8192x28672 --rows 1 16 4096 --formats int4-g128 fp8
    python scripts/bench_kernels.py --cuda-graph --json bench.json

Shapes are in_features x out_features (K x N, the weight is [N, K]); for every shape, row count M
(activation rows: 1 to 16 take the split-K GEMV, more the GEMM) and format it prints

    us        median time of `lowbit.kernels.triton_qlinear.qlinear` (the Triton backend, without the
              torch.library op around it) by triton.testing.do_bench (L2 flushed before every run);
    bf16 us   median time of torch.nn.functional.linear with a bf16 weight, same shape, same run;
    speedup   bf16 us / us;
    GB/s      bytes moved / us, bytes = packed codes + scales + zeros + second-level scales +
              low-rank factors + activations in and out (bf16);
    floor us  bytes / the device's copy bandwidth, measured at start-up (a 1 GiB device-to-device copy);
    x floor   us / floor us: 1.0 is the memory-bandwidth limit (decode sizes should approach it);
    max err   relative error against the reference backend (max |y - y_ref| / max |y_ref|).

Formats: int4-g128 (rank 0 and 64: int4-g128-r64), nf4-g64, int3-g128, int2-g64, fp8 (E4M3 weights,
per-channel scales, dequantized to bf16) and fp8-w8a8 (the same weights with FP8 activations on
compute capability >= 8.9; elsewhere the "triton" backend runs and the row says so).
Without --cuda-graph the time of small-M rows includes Python launch overhead (tens of microseconds);
--cuda-graph replays each call from a CUDA graph (triton.testing.do_bench_cudagraph) to measure the
kernels alone. Activations are bf16; weights are random normal with std 0.02.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from lowbit.kernels import reference
from lowbit.quantizers import QuantSpec, quantize

SHAPES = ["4096x4096", "4096x11008", "11008x4096", "8192x8192", "8192x28672"]
ROWS = [1, 4, 16, 64, 256, 4096]
# name -> (spec, low-rank rank, backend)
FORMATS = {
    "int4-g128": (QuantSpec("int4", 128), 0, "triton"),
    "int4-g128-r64": (QuantSpec("int4", 128), 64, "triton"),
    "nf4-g64": (QuantSpec("nf4", 64), 0, "triton"),
    "int3-g128": (QuantSpec("int3", 128), 0, "triton"),
    "int2-g64": (QuantSpec("int2", 64), 0, "triton"),
    "fp8": (QuantSpec("fp8_e4m3", None), 0, "triton"),
    "fp8-w8a8": (QuantSpec("fp8_e4m3", None), 0, "triton_w8a8"),
}
DTYPE = torch.bfloat16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="K x N shapes (in_features x out_features)")
    p.add_argument("--rows", nargs="+", type=int, default=ROWS, help="activation rows M")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (no launch overhead)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    return p.parse_args(argv)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device memory bandwidth in bytes/s: a device-to-device copy reads and writes nbytes."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def bench(fn, cuda_graph: bool) -> float:
    """Median milliseconds of fn()."""
    import triton.testing

    fn()  # compile and autotune outside the timed (and captured) runs
    torch.cuda.synchronize()
    if cuda_graph:
        return triton.testing.do_bench_cudagraph(fn, return_mode="median")
    return triton.testing.do_bench(fn, return_mode="median")


def make_layer(name: str, k: int, n: int, device: torch.device) -> dict:
    """The quantized weight, low-rank factors and bf16 weight of one benchmark case."""
    spec, rank, backend = FORMATS[name]
    w = 0.02 * torch.randn(n, k, device=device)
    layer = dict(q=quantize(w, spec), backend=backend, w=w.to(DTYPE))
    layer["l1"] = 0.01 * torch.randn(n, rank, device=device, dtype=DTYPE) if rank else None
    layer["l2"] = 0.01 * torch.randn(rank, k, device=device, dtype=DTYPE) if rank else None
    return layer


def moved_bytes(layer: dict, m: int, k: int, n: int) -> int:
    low = sum(t.numel() * t.element_size() for t in (layer["l1"], layer["l2"]) if t is not None)
    return layer["q"].nbytes() + low + (m * k + m * n) * DTYPE.itemsize


def bench_row(layer: dict, name: str, m: int, k: int, n: int, bandwidth: float, cuda_graph: bool) -> dict:
    from lowbit.kernels import triton_fp8, triton_qlinear

    q, l1, l2 = layer["q"], layer["l1"], layer["l2"]
    x = torch.randn(m, k, device=layer["w"].device, dtype=DTYPE)
    fn = triton_qlinear.qlinear_w8a8 if layer["backend"] == "triton_w8a8" else triton_qlinear.qlinear
    y = fn(x, q, l1, l2)
    y_ref = reference.qlinear(x, q, l1, l2)
    err = float((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max())
    ms = bench(lambda: fn(x, q, l1, l2), cuda_graph)
    ms_bf16 = bench(lambda: torch.nn.functional.linear(x, layer["w"]), cuda_graph)
    nbytes = moved_bytes(layer, m, k, n)
    floor_ms = nbytes / bandwidth * 1e3
    w8a8_ran = layer["backend"] == "triton_w8a8" and m > 16 and triton_fp8.w8a8_applies(q, x.device)
    note = "" if layer["backend"] == "triton" or w8a8_ran else "ran the triton backend"
    return dict(
        shape=f"{k}x{n}",
        m=m,
        format=name,
        us=ms * 1e3,
        bf16_us=ms_bf16 * 1e3,
        speedup=ms_bf16 / ms,
        gb_per_s=nbytes / (ms * 1e-3) / 1e9,
        floor_us=floor_ms * 1e3,
        x_floor=ms / floor_ms,
        max_err=err,
        note=note,
    )


HEADER = f"{'shape':>11} {'M':>5} {'format':>14} {'us':>9} {'bf16 us':>9} {'speedup':>8} {'GB/s':>7} "
HEADER += f"{'floor us':>9} {'x floor':>8} {'max err':>8}"


def format_row(r: dict) -> str:
    return (
        f"{r['shape']:>11} {r['m']:>5} {r['format']:>14} {r['us']:>9.1f} {r['bf16_us']:>9.1f} "
        f"{r['speedup']:>8.2f} {r['gb_per_s']:>7.0f} {r['floor_us']:>9.1f} {r['x_floor']:>8.2f} "
        f"{r['max_err']:>8.1e} {r['note']}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_kernels.py measures GPU kernels and needs a CUDA GPU; none is available here.",
            file=sys.stderr,
        )
        return 1
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"device: {torch.cuda.get_device_name(device)}; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(HEADER)
    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        for name in args.formats:
            layer = make_layer(name, k, n, device)
            for m in args.rows:
                rows.append(bench_row(layer, name, m, k, n, bandwidth, args.cuda_graph))
                print(format_row(rows[-1]), flush=True)
            del layer
            torch.cuda.empty_cache()
    if args.json:
        meta = dict(
            device=torch.cuda.get_device_name(device),
            copy_gb_per_s=bandwidth / 1e9,
            cuda_graph=args.cuda_graph,
        )
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
