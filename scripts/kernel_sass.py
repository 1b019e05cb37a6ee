"""What the Triton kernels issue per weight, judged on a CPU: compile for sm_90 / sm_80, read the SASS.

Usage:
    python scripts/kernel_sass.py                        # every kernel and configuration, sm_90
    python scripts/kernel_sass.py --arch 80 90 --json sass.json
    python scripts/kernel_sass.py --kernels decode --formats int4-g128 int4-g128-r64

No GPU is needed: each kernel is compiled with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))` (the ptxas bundled in the triton wheel) and disassembled with the
wheel's `cuobjdump -sass`; `cuobjdump -res-usage` gives registers and local memory. For every kernel,
format and configuration (one row each) it prints

    sass/w      thread-instructions per weight in the hot loop: the SASS instructions of the largest
                innermost loop (a backward branch and what it jumps over; NOPs not counted) times the
                threads of a program, over the weights one iteration of that loop reads (BLOCK_N * BLOCK_K);
    regs        registers per thread;  spills: bytes of local memory (LDL/STL spill traffic) per thread;
    launches    device kernels one QLinear call at that M starts: Triton launches plus every torch op
                that is not a view or an allocation, counted from a traced call under Triton's CPU
                interpreter (in a subprocess).

At 3.35 TB/s and 0.53 bytes per int4 g128 weight an H100 (132 SMs x 4 schedulers x 32 lanes at
1.75 GHz) issues about 5.6 thread-instructions per weight at perfect issue, about 2.5 in practice.
--json writes a list of {"kernel", "format", "M", "config", "sass_per_weight", "registers", "spills",
"launches_per_call"} objects. gemlite (the `gemlite` package) is compiled the same way when installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from sass_gemlite import gemlite_cases
from sass_tools import Case, analyse, table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# launches are counted in a subprocess under the interpreter, whose Triton must be imported fresh
LAUNCH_SCRIPT = r"""
import json, sys, torch
from lowbit.kernels.dispatch import BACKENDS
from lowbit.kernels.prepared import Prepared
from lowbit.kernels.trace import count_launches
from lowbit.quantizers import QuantSpec, quantize

out = []
for spec, rank, m, backend in json.loads(sys.argv[1]):
    n, k = 96, 256
    q = quantize(torch.randn(n, k), QuantSpec(*spec))
    l1 = 0.1 * torch.randn(n, rank, dtype=torch.bfloat16) if rank else None
    l2 = 0.1 * torch.randn(rank, k, dtype=torch.bfloat16) if rank else None
    x = torch.randn(m, k, dtype=torch.bfloat16)
    if backend != "triton":
        call = lambda: BACKENDS[backend](x, q, l1, l2, None, None)
    else:
        call = Prepared(q, l1, l2, None, None)  # what QLinear runs without gradients
        call = (lambda layer: lambda: layer(x))(call)
    call()  # first call: layouts, configurations, scratch, autotuning
    out.append(count_launches(call))
print(json.dumps(out))
"""


def launches(cases: list[tuple], root: Path) -> list[int]:
    """Device kernels per QLinear call for each (spec args, rank, M, backend), under the interpreter."""
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", LAUNCH_SCRIPT, json.dumps(cases)], capture_output=True, text=True, env=env
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


FORMATS = {  # name -> (QuantSpec arguments, rank)
    "int4-g128": (("int4", 128), 0),
    "int4-g128-r64": (("int4", 128), 64),
    "nf4-g64": (("nf4", 64), 0),
    "int3-g128": (("int3", 128), 0),
    "int3-g128-r64": (("int3", 128), 64),
    "int2-g64": (("int2", 64), 0),
    "int8": (("int8", None), 0),
    "fp8-e4m3": (("fp8_e4m3", None), 0),
    "fp4-g32": (("fp4_e2m1", 32), 0),
    "fp8-w8a8": (("fp8_e4m3", None), 0),
}
# the formats of the split-K kernel on the decode layout (`triton_decode`), and those compiled for the
# one-launch kernel that reads the checkpoint's layout (`triton_fused`: every format and dtype the decode
# layout does not take; here the minifloats, which a call with 16-bit activations ran on before the
# decode layout took them, for comparison)
DECODE_FORMATS = ("int4-g128", "int4-g128-r64", "nf4-g64", "int3-g128", "int3-g128-r64", "int2-g64", "int8",
                  "fp8-e4m3", "fp4-g32")  # fmt: skip
FUSED_FORMATS = ("fp8-e4m3", "fp4-g32")


def format_consts(name: str) -> dict:
    """The weight-format constexprs (and absent pointers) of the Triton kernels for a FORMATS entry."""
    from lowbit.kernels.triton_common import format_constexprs
    from lowbit.quantizers import QTensor, QuantSpec

    spec, rank = FORMATS[name]
    spec = QuantSpec(*spec)
    consts = format_constexprs(QTensor(None, None, None, None, spec, (4096, 4096)))
    absent = dict(dq_absmax_ptr=None, smooth_ptr=None, bias_ptr=None)
    if not consts["HAS_ZEROS"]:
        absent["zeros_ptr"] = None
    if rank == 0:
        absent.update(t_ptr=None, l1_ptr=None, l2_ptr=None)
    if spec.kind != "nf":
        absent["lut_ptr"] = None
    return dict(consts, **absent, HAS_SMOOTH=False, HAS_BIAS=False, HAS_LOWRANK=rank > 0,
                BLOCK_R=64 if rank else 16, DOT_PRECISION="tf32")  # fmt: skip


POINTERS = dict(codes_ptr="*u8", scales_ptr="*fp16", lut_ptr="*fp32", acc_ptr="*fp32", xq_ptr="*fp8e4nv",
                x_scale_ptr="*fp32")  # fmt: skip


def config_name(c) -> str:
    return ",".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in c.kwargs.items()) + (
        f",w={c.num_warps},s={c.num_stages}"
    )


def cases(arch: int = 90) -> list[Case]:
    """Every kernel, format and configuration a QLinear call may run: the split-K kernel of 4-bit INT /
    NF (`triton_decode`) and of the other formats (`triton_fused`) per M bucket, the fold of the
    two-launch large-M path (behind a measured crossover), the FP8 W8A8 GEMM; then the GEMV / GEMM of the
    torch op (the path with gradients, int3-g128 here) in every autotune configuration."""
    from lowbit.kernels import triton_gemm, triton_gemv, triton_large

    out = []
    for fmt in DECODE_FORMATS:
        out += decode_cases(fmt, arch)
    for fmt in FUSED_FORMATS:
        out += fused_cases(fmt)
    # the fold (dequantize + L1 L2, times 1 / smooth) has no loop: its whole program is counted
    bn, bk = triton_large.BLOCK_N, triton_large.BLOCK_K
    for fmt in ("int4-g128", "int4-g128-r64", "nf4-g64", "int3-g128"):
        kw = dict(format_consts(fmt), BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=triton_large.BLOCK_R)
        out.append(Case("fold", fmt, "crossover+", f"N={bn},K={bk},w=4", triton_large._fold_kernel, kw,
                        dict(POINTERS, inv_smooth_ptr="*fp32"), 4, 1, bn * bk, True))  # fmt: skip
    out += w8a8_cases()
    consts = format_consts("int3-g128")
    for c in triton_gemv.GEMV_CONFIGS:
        for block_m, m in ((1, "1"), (16, "2-16")):
            kw = dict(consts, **c.kwargs, BLOCK_M=block_m)
            out.append(
                Case(
                    "op-gemv",
                    "int3-g128",
                    m,
                    config_name(c),
                    triton_gemv._qgemv_kernel.fn,
                    kw,
                    POINTERS,
                    c.num_warps,
                    c.num_stages,
                    c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"],
                )
            )
    for c in triton_gemm.GEMM_CONFIGS:
        kw = dict(consts, **c.kwargs, GROUP_M=8)
        out.append(
            Case(
                "op-gemm",
                "int3-g128",
                "17+",
                config_name(c),
                triton_gemm._qgemm_kernel.fn,
                kw,
                POINTERS,
                c.num_warps,
                c.num_stages,
                c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"],
            )
        )
    return out


def w8a8_cases() -> list[Case]:
    """The one-launch FP8 W8A8 kernel (`triton_w8a8`, per-channel FP8 E4M3 weights, bf16 activations)
    on a 4096 x 4096 layer, one row per configuration of its row buckets."""
    from lowbit.kernels import triton_w8a8

    consts = dict(format_consts("fp8-w8a8"), inv_smooth_ptr=None, xs_ptr=None, DOT_IEEE=False,
                  ROUND_IN_FP32=False)  # fmt: skip
    pointers = dict(DECODE_POINTERS, codes_ptr="*u8", scales_ptr="*fp16")
    out = []
    for m, label in ((32, "17-32"), (64, "33-64"), (128, "65-128"), (256, "129-256"), (512, "257+")):
        config = triton_w8a8.w8a8_config(m, 4096, 4096, None, 0, False, 132)
        warps, stages = config.pop("num_warps"), config.pop("num_stages")
        bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
        name = f"M={bm},N={bn},K={bk},SPLIT_K={config['SPLIT_K']},w={warps},s={stages}"
        out.append(Case("w8a8", "fp8-w8a8", label, name, triton_w8a8._w8a8_kernel, dict(consts, **config),
                        pointers, warps, stages, bn * bk))  # fmt: skip
    return out


DECODE_POINTERS = dict(words_ptr="*i32", scales_ptr="*fp32", offsets_ptr="*bf16", lut_ptr="*i32",
                       inv_smooth_ptr="*fp32", ws_ptr="*fp32", t_ptr="*fp32", lock_ptr="*i32")  # fmt: skip


# (rows the configuration is chosen for, the M range it serves) of the split-K kernels
DECODE_BUCKETS = ((16, "1-16"), (32, "17-32"), (64, "33-64"), (128, "65-128"), (256, "129-256"),
                  (1024, "257+"))  # fmt: skip


def fused_cases(fmt: str) -> list[Case]:
    """The one-launch kernel of the other formats (`triton_fused`) on a 4096 x 4096 layer of `fmt` (bf16
    activations), one row per M bucket."""
    from lowbit.kernels import triton_fused
    from lowbit.quantizers import QTensor, QuantSpec

    spec, rank = FORMATS[fmt]
    q = QTensor(None, None, None, None, QuantSpec(*spec), (4096, 4096))
    tile = triton_fused.block_k(q)
    consts = dict(format_consts(fmt), inv_smooth_ptr=None, xs_ptr=None, DOT_IEEE=False)
    out = []
    for m, label in DECODE_BUCKETS:
        config = triton_fused.fused_config(m, 4096, 4096, tile, rank, False, 132)
        stages = config.pop("num_stages")
        name = f"N={triton_fused.BLOCK_N},K={tile},M={config['BLOCK_M']},SPLIT_K={config['SPLIT_K']}"
        out.append(Case("fused", fmt, label, name, triton_fused._fused_kernel,
                        dict(consts, **config, BLOCK_N=triton_fused.BLOCK_N), DECODE_POINTERS | POINTERS,
                        triton_fused.NUM_WARPS, stages, triton_fused.BLOCK_N * tile))  # fmt: skip
    return out


def decode_cases(fmt: str, arch: int = 90) -> list[Case]:
    """The decode kernel on a 4096 x 4096 layer of `fmt` (bf16 activations), one row per M bucket, in
    the configurations a device of compute capability `arch` runs."""
    from lowbit.kernels import triton_decode
    from lowbit.kernels.layout import MAGIC, decode_tile, layout_bits, layout_fmt
    from lowbit.quantizers import QuantSpec

    spec, rank = FORMATS[fmt]
    spec = QuantSpec(*spec)
    n = k = 4096
    bits = layout_bits(spec)
    tile = decode_tile(spec.group_size, k, bits)
    fmt_const = layout_fmt(spec)
    absent = dict(lut_ptr=None) if fmt_const == "int" else {}
    absent.update(inv_smooth_ptr=None, bias_ptr=None, xs_ptr=None)
    if not rank:
        absent.update(l1_ptr=None, l2_ptr=None, t_ptr=None)
    out = []
    for m, label in DECODE_BUCKETS:
        config = triton_decode.decode_config(m, n, k, tile, spec.group_size or k, rank, False, 132, bits,
                                             arch >= 90)  # fmt: skip
        stages, warps = config.pop("num_stages"), config.pop("num_warps")
        consts = dict(absent, **config, FMT=fmt_const, BITS=bits, EVEN_K=True, USE_ASM=True,
                      MAGIC_VALUE=MAGIC[torch.bfloat16], GROUP_SIZE=spec.group_size or k, HAS_SMOOTH=False,
                      HAS_LOWRANK=rank > 0, HAS_BIAS=False,
                      DOT_IEEE=False, TILE=tile)  # fmt: skip
        name = f"N={config['BLOCK_N']},K={tile},M={config['BLOCK_M']},SPLIT_K={config['SPLIT_K']}" + (
            ",SCALE_W" if config["SCALE_W"] else ""
        ) + f",w={warps}"
        out.append(
            Case(
                "decode",
                fmt,
                label,
                name,
                triton_decode._decode_kernel,
                consts,
                dict(DECODE_POINTERS, offsets_ptr="*fp32") if bits == 8 else DECODE_POINTERS,
                warps,
                stages,
                config["BLOCK_N"] * tile,
            )
        )
    return out


# (format, M) pairs whose launches per call are counted; a row takes the count of its format at the
# first M of its M range
LAUNCH_MS = (1, 2, 17, 33, 65, 129, 257, 1024, 4096)


def launch_rows(counts: dict) -> list[dict]:
    """One row per format: the launches per call at every counted M, whatever path serves it."""
    ms = ",".join(map(str, LAUNCH_MS))
    per_m = {f: ",".join(str(counts[(f, m)]) for m in LAUNCH_MS) for f in FORMATS}
    return [dict(kernel="(call)", format=f, M=ms, launches_per_call=per_m[f]) for f in FORMATS]


def launch_cases() -> list[tuple]:
    return [(f, FORMATS[f][0], FORMATS[f][1], m, "triton_w8a8" if f == "fp8-w8a8" else "triton")
            for f in FORMATS for m in LAUNCH_MS]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", type=int, default=[90], help="compute capabilities, e.g. 80 90")
    p.add_argument("--kernels", nargs="+", help="only these kernel names (default: all)")
    p.add_argument("--formats", nargs="+", choices=list(FORMATS), help="only these formats (default: all)")
    p.add_argument("--no-launches", action="store_true", help="skip the interpreter launch count")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = []
    for arch in args.arch:  # configurations may depend on the architecture
        todo = [c for c in cases(arch) + gemlite_cases() if (not args.kernels or c.kernel in args.kernels)]
        rows += [analyse(c, arch) for c in todo if not args.formats or c.format in args.formats]
    if not args.no_launches:
        lc = launch_cases()
        counts = dict(zip([(c[0], c[3]) for c in lc], launches([c[1:] for c in lc], ROOT), strict=True))
        for r in (r for r in rows if r["kernel"] in ("decode", "fused", "w8a8")):  # a QLinear call's kernels
            first = int(r["M"].split("-")[0].rstrip("+"))
            r["launches_per_call"] = counts.get((r["format"], first), "")
        rows += launch_rows(counts)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
