"""One command for a GPU: correctness of the Triton path end to end, then the kernel timing table.

Usage:
    python scripts/gpu_check.py --dry-run                 # on any machine: check the plan, then exit
    python scripts/gpu_check.py --out gpu_check/          # on a CUDA GPU (about 8 minutes on an H100)
    python scripts/gpu_check.py --out gpu_check/ --shapes 4096x4096 --rows 1 16 --formats int4-g128

1. Correctness: the built-in model with every decoder linear layer quantized to int4-g128 (round to
   nearest, rank 16 random low-rank factors) is saved with `lowbit.save`, loaded back with
   `lowbit.load(..., device="cuda", dtype=bfloat16)` once per backend ("triton", "reference"); the
   logits of a prompt (relative error) and 16 greedily generated tokens (how many agree) are compared.
2. Kernel table: for every shape (K x N), format and row count M, the QLinear call without gradients
   (`lowbit.kernels.prepared`: one launch for the decode rows) and a bf16 `torch.matmul` on the same
   activations, each timed from a CUDA graph that runs the call on COPIES copies of the weight in turn
   (together more than twice the L2 cache: one copy would stay in L2 and flatter a 4-bit weight); time
   per call = graph replay time / copies (median of triton.testing.do_bench_cudagraph). Columns: us,
   bf16 us, speedup (bf16 us / us), floor us (bytes moved over the device's copy bandwidth measured
   at start), x floor (us / floor us), max err against the reference; from FOLD_ROWS rows also fold
   us, the two-launch path (`triton_large.large`: dequantize into a scratch, one cuBLAS GEMM): where it
   beats us, its first M is the format's measured crossover (`triton_large.CROSSOVER_M`).

Writes gpu_check.json (all rows and the correctness results) and gpu_check.md (markdown tables) into
--out. --dry-run needs no GPU: it checks every format, shape and row count, the kernels' imports and the
memory each case needs on an 80 GiB GPU, prints the plan and exits 0 (1 if anything is wrong).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = ["4096x4096", "8192x8192", "8192x28672"]
ROWS = [1, 4, 16, 64, 256, 1024, 4096]
# name -> (QuantSpec arguments, rank, backend)
FORMATS = {
    "int4-g128": (("int4", 128), 0, "triton"),
    "int4-g128-r64": (("int4", 128), 64, "triton"),
    "nf4-g64": (("nf4", 64), 0, "triton"),
    "int3-g128": (("int3", 128), 0, "triton"),
    "int2-g64": (("int2", 64), 0, "triton"),
    "fp8-w8a8": (("fp8_e4m3", None), 0, "triton_w8a8"),
    "fp8-w8a8-scaled-mm": (("fp8_e4m3", None), 0, "triton_w8a8_scaled_mm"),
}
FOLD_ROWS = 256  # the two-launch large-M path is timed from this many rows
L2_BYTES = 50 * 2**20  # H100 (H200: 50 MiB as well)
GPU_BYTES = 80 * 2**30
DTYPE = torch.bfloat16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for gpu_check.json and gpu_check.md (required without --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="check the plan and exit (no GPU needed)")
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="K x N shapes (in_features x out_features)")
    p.add_argument("--rows", nargs="+", type=int, default=ROWS, help="activation rows M")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), help=f"of {', '.join(FORMATS)}")
    return p.parse_args(argv)


def weight_bytes(name: str, k: int, n: int) -> int:
    """Bytes of one stored weight of format `name` (codes, scales, zeros, low-rank factors in bf16)."""
    from lowbit.quantizers import QuantSpec, storage_bits

    spec, rank, _ = FORMATS[name]
    return storage_bits(QuantSpec(*spec), (n, k)) // 8 + 2 * rank * (n + k)


def plan(args: argparse.Namespace) -> list[dict]:
    """Every (shape, format, M) case with its weight copies and peak memory; ValueError on bad input."""
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    if any(m < 1 for m in args.rows):
        raise ValueError("row counts must be positive")
    cases = []
    for shape in args.shapes:
        try:
            k, n = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            raise ValueError(f"shape {shape!r} is not KxN") from None
        for name in args.formats:
            wb = weight_bytes(name, k, n)
            copies = max(2, -(-2 * L2_BYTES // wb) + 1)
            for m in args.rows:
                peak = copies * (wb + 2 * n * k) + 2 * m * (k + n) * 4  # quantized + bf16 copies, x, y
                if peak > GPU_BYTES // 2:
                    raise ValueError(f"{shape} {name} M={m} needs {peak / 2**30:.1f} GiB")
                cases.append(dict(shape=shape, k=k, n=n, format=name, m=m, copies=copies, peak_bytes=peak))
    return cases


def dry_run(args: argparse.Namespace) -> int:
    """Check the plan and that everything the GPU run imports is importable; print the plan."""
    try:
        cases = plan(args)
    except ValueError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 1
    import triton  # noqa: F401
    from bench_cpu_generate import quantize_blocks  # noqa: F401

    from lowbit.kernels import prepared, triton_decode, triton_fused, triton_large, triton_w8a8  # noqa: F401
    from lowbit.nn.checkpoint import model_plan  # noqa: F401

    peak = max(c["peak_bytes"] for c in cases)
    copies = sorted(c["copies"] for c in cases)
    print(f"gpu_check plan: {len(cases)} kernel cases ({len(args.shapes)} shapes x {len(args.formats)} "
          f"formats x {len(args.rows)} row counts), peak {peak / 2**30:.1f} GiB, "
          f"weight copies per case {copies[0]}-{copies[-1]}")  # fmt: skip
    print("dry run: no GPU work done")
    return 0


def correctness(device: torch.device) -> dict:
    """The built-in model, int4-g128 + rank 16, saved and loaded per backend: logits and greedy tokens."""
    from bench_cpu_generate import quantize_blocks

    import lowbit
    from lowbit.models import load_model
    from lowbit.nn.checkpoint import model_plan
    from lowbit.quantizers import QuantSpec

    model, tok = load_model("smollm2-135m")
    quantize_blocks(model, QuantSpec("int4", 128), 16)
    ids = tok("The capital of France is", return_tensors="pt").input_ids.to(device)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        lowbit.save(model, Path(tmp) / "ckpt", plan=model_plan(model), tokenizer=tok)
        for backend in ("reference", "triton"):
            m = lowbit.load(Path(tmp) / "ckpt", device=device, dtype=DTYPE, backend=backend)
            with torch.inference_mode():
                logits = m(ids).logits.float()
                gen = m.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
            result[backend] = (logits, gen[0, ids.shape[1] :])
    (lr, gr), (lt, gt) = result["reference"], result["triton"]
    err = float((lt - lr).abs().max() / lr.abs().max())
    return dict(logits_rel_err=err, tokens_agree=int((gr == gt).sum()), tokens=len(gr))


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device memory bandwidth in bytes/s: a device-to-device copy reads and writes nbytes."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def graph_time(calls: list) -> float:
    """Microseconds per call: one CUDA graph runs every call once (each on its own weight copy)."""
    import triton.testing

    for c in calls:  # compile, autotune, build layouts and scratch outside the graph
        c()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench_cudagraph(lambda: [c() for c in calls], return_mode="median")
    return ms * 1e3 / len(calls)


def kernel_row(case: dict, bandwidth: float, device: torch.device) -> dict:
    from lowbit.kernels import reference, triton_large
    from lowbit.kernels.dispatch import BACKENDS
    from lowbit.kernels.prepared import Prepared
    from lowbit.quantizers import QuantSpec, quantize

    spec, rank, backend = FORMATS[case["format"]]
    k, n, m, copies = case["k"], case["n"], case["m"], case["copies"]
    x = torch.randn(m, k, device=device, dtype=DTYPE)
    layers, dense = [], []
    for _ in range(copies):
        w = 0.02 * torch.randn(n, k, device=device)
        q = quantize(w, QuantSpec(*spec))
        l1 = 0.01 * torch.randn(n, rank, device=device, dtype=DTYPE) if rank else None
        l2 = 0.01 * torch.randn(rank, k, device=device, dtype=DTYPE) if rank else None
        layers.append((q, l1, l2))
        dense.append(w.to(DTYPE))
    if backend != "triton":  # the W8A8 backends: their function, without the op's dispatch
        calls = [lambda q=q, a=a, b=b: BACKENDS[backend](x, q, a, b, None, None) for q, a, b in layers]
    else:
        calls = [(lambda p: lambda: p(x))(Prepared(q, a, b, None, None)) for q, a, b in layers]
    y, want = calls[0](), reference.qlinear(x, *layers[0])
    err = float((y.float() - want.float()).abs().max() / want.float().abs().max())
    us = graph_time(calls)
    bf16_us = graph_time([lambda w=w: torch.matmul(x, w.T) for w in dense])
    fold_us = None
    if m >= FOLD_ROWS and backend == "triton":
        fold_us = round(graph_time([lambda q=q, a=a, b=b: triton_large.large(x, q, a, b, None, None)
                                    for q, a, b in layers]), 2)  # fmt: skip
    floor_us = (weight_bytes(case["format"], k, n) + 2 * m * (k + n)) / bandwidth * 1e6
    return dict(shape=case["shape"], format=case["format"], m=m, us=round(us, 2), bf16_us=round(bf16_us, 2),
                speedup=round(bf16_us / us, 3), floor_us=round(floor_us, 2), x_floor=round(us / floor_us, 2),
                max_err=err, copies=copies, fold_us=fold_us)  # fmt: skip


def markdown(rows: list[dict], check: dict, device_name: str) -> str:
    cols = ["shape", "format", "m", "us", "bf16_us", "speedup", "floor_us", "x_floor", "max_err", "fold_us"]
    lines = [f"GPU check on {device_name}", "", f"correctness: {json.dumps(check)}", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |"
              for r in rows]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if not args.out:
        print("gpu_check: --out is required (or --dry-run)", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU; use --dry-run to check the plan", file=sys.stderr)
        return 1
    cases = plan(args)
    device = torch.device("cuda")
    check = correctness(device)
    bandwidth = copy_bandwidth(device)
    rows = []
    for case in cases:
        rows.append(kernel_row(case, bandwidth, device))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device)
    report = dict(device=name, copy_bandwidth=bandwidth, correctness=check, rows=rows)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(rows, check, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
