"""The Triton kernels against the reference, run on CPU tensors by Triton's interpreter.

Triton reads TRITON_INTERPRET when a function is decorated with `@triton.jit`: its own library
functions (tl.cdiv, tl.sum, ...) when triton is first imported, lowbit's kernels when lowbit's Triton
modules are first imported (`import lowbit` never does). The variable is set here, before both. When
another test module of the same session imported triton earlier (torch._dynamo does), Triton's
functions are compiled-only: the tests then run in a fresh process (test_in_a_fresh_process).
"""

import os

_PREVIOUS = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from lowbit.kernels import (  # noqa: E402
    BackendError,
    KernelInputError,
    qlinear,
    reference,
    triton_gemm,
    triton_gemv,
    triton_qlinear,
)
from lowbit.kernels.dispatch import resolve_backend  # noqa: E402
from lowbit.quantizers import QuantSpec, dequantize, quantize  # noqa: E402

IN_PROCESS = type(triton.language.standard.cdiv).__name__ == "InterpretedFunction"
if not IN_PROCESS:  # leave the session as it was; the fresh process sets the variable itself
    if _PREVIOUS is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS
# tests that start their own process and run in either case
OWN_PROCESS = {
    "test_in_a_fresh_process",
    "test_importing_lowbit_does_not_import_triton",
    "test_kernels_compile_for_ampere_and_hopper",
}


def skip_without_the_interpreter(request, own_process=OWN_PROCESS) -> None:
    """Skip a test that needs the interpreter in this process when it does not run here."""
    if not IN_PROCESS and request.node.originalname not in own_process:
        pytest.skip("triton was imported before TRITON_INTERPRET=1: run by test_in_a_fresh_process")


def run_in_a_fresh_process(test_file: str) -> None:
    """Run the tests of `test_file` in a new process with the interpreter on (unless it runs here)."""
    if IN_PROCESS:
        pytest.skip("the interpreter runs in this process")
    env = os.environ | {"TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-m", "not slow", "-p", "no:cacheprovider"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


@pytest.fixture(autouse=True)
def _needs_the_interpreter(request):
    skip_without_the_interpreter(request)


def test_in_a_fresh_process():
    run_in_a_fresh_process(__file__)


# odd N; K not a multiple of 8, with a ragged last group for every group size below
N, K = 83, 597
GEMV_M, GEMM_M = 5, 33
# relative error bound (max abs error / max abs value) against a float64 evaluation of the reference
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}

SPECS = [
    QuantSpec("int2", 64),
    QuantSpec("int2", 32, symmetric=True),
    QuantSpec("int3", 128),
    QuantSpec("int3", 48, symmetric=True),
    QuantSpec("int3", 32),  # 19 packed 3-bit zero points a row, some across two bytes; 2 groups a tile
    QuantSpec("int4", 128),
    QuantSpec("int4", 40, symmetric=True, scale_dtype="bfloat16"),
    QuantSpec("int4", 128, double_quant=True),
    QuantSpec("int4", 32, double_quant=True),
    QuantSpec("int8", None),
    QuantSpec("int8", 64, symmetric=True, scale_dtype="float32"),
    QuantSpec("nf2", 64),
    QuantSpec("nf3", 128),
    QuantSpec("nf4", 64),
    QuantSpec("nf4", 64, double_quant=True),
    QuantSpec("fp8_e4m3", None),
    QuantSpec("fp8_e4m3", 128),
    QuantSpec("fp8_e5m2", 64, scale_dtype="bfloat16"),
    QuantSpec("fp4_e2m1", 32),
]
# (M, rank, smooth, bias): every mode on and off, every path (M = 1 and 5: GEMV, 33: GEMM)
MODES = [(1, 0, False, False), (5, 4, True, True), (33, 0, True, False), (1, 4, False, True),
         (5, 0, False, True), (33, 4, False, False), (1, 4, True, False), (33, 4, True, True)]  # fmt: skip


def make_case(spec, rank=0, smooth=False, bias=False, dtype=torch.float32, seed=0, n=N, k=K):
    """(q, l1, l2, smooth, bias) for a random n x k weight; factors in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    q = quantize(torch.randn(n, k, generator=g), spec)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    l1, l2 = (rand(n, rank, scale=0.1), rand(rank, k, scale=0.1)) if rank else (None, None)
    s = (0.5 + torch.rand(k, generator=g)).to(dtype) if smooth else None
    return q, l1, l2, s, rand(n) if bias else None


def rand_x(m, dtype=torch.float32, seed=1):
    return torch.randn(m, K, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run_kernel(x, q, l1, l2, smooth, bias, **kw):
    """The GEMV (M <= 16) or GEMM path on x [M, K], into an output pre-filled with NaN."""
    x_s = x if smooth is None else x / smooth
    t = None if l2 is None else x_s @ l2.T
    out = torch.full((x.shape[0], N), float("nan"), dtype=x.dtype)
    kernel = triton_gemv.qgemv if x.shape[0] <= triton_gemv.MAX_ROWS else triton_gemm.qgemm
    y = kernel(x_s, q, t, l1, bias, out=out, **kw)  # the caller smooths x once
    assert y is out
    return y


def relative_error(y, x, q, l1, l2, smooth, bias):
    def d(t):
        return None if t is None else t.double()

    want = reference.qlinear(x.double(), q, d(l1), d(l2), d(smooth), d(bias))
    assert y.shape == want.shape and not y.isnan().any()
    return float((y.double() - want).abs().max() / want.abs().max())


def test_kernels_run_in_the_interpreter():
    assert IN_PROCESS
    assert type(triton_gemm._qgemm_kernel.fn).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("m", [GEMV_M, GEMM_M])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_one_hot_rows_read_back_every_dequantized_weight_exactly(spec, m):
    """Row i of x selects one column c_i of W: y[i] must be W_hat[:, c_i] bit for bit (one product)."""
    q = make_case(spec)[0]
    cols = torch.linspace(0, K - 1, m).round().long()  # first and last column, ragged group included
    x = torch.zeros(m, K)
    x[torch.arange(m), cols] = 1.0
    y = run_kernel(x, q, None, None, None, None)
    assert torch.equal(y, dequantize(q)[:, cols].T)


@pytest.mark.parametrize("i, spec", list(enumerate(SPECS)), ids=[s.short() for s in SPECS])
def test_every_format_matches_the_reference(i, spec):
    m, rank, smooth, bias = MODES[i % len(MODES)]
    q, *parts = make_case(spec, rank, smooth, bias, seed=i)
    x = rand_x(m)
    assert relative_error(run_kernel(x, q, *parts), x, q, *parts) <= TOL[torch.float32]


@pytest.mark.parametrize("m, rank, smooth, bias", MODES)
def test_every_mode_matches_the_reference(m, rank, smooth, bias):
    q, *parts = make_case(QuantSpec("int4", 128), rank, smooth, bias)
    x = rand_x(m)
    assert relative_error(run_kernel(x, q, *parts), x, q, *parts) <= TOL[torch.float32]


@pytest.mark.parametrize("m", [1, GEMV_M, GEMM_M])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype, m):
    q, *parts = make_case(QuantSpec("nf4", 64, double_quant=True), 4, True, True, dtype=dtype)
    x = rand_x(m, dtype)
    y = run_kernel(x, q, *parts)
    assert y.dtype == dtype
    assert relative_error(y, x, q, *parts) <= TOL[dtype]


def test_rank_above_one_rank_tile_and_other_tiles():
    """Rank 70 spans two BLOCK_R tiles; GEMM tiles of 16 rows, K tiles of 32 (group 48 straddles them)."""
    q, *parts = make_case(QuantSpec("int3", 48), rank=70, smooth=True, bias=True)
    x = rand_x(17)
    config = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=4)
    assert relative_error(run_kernel(x, q, *parts, config=config), x, q, *parts) <= TOL[torch.float32]


@pytest.mark.parametrize("split_k", [1, 3, 16])
def test_gemv_split_k(split_k):
    """One K range, uneven K ranges (19 tiles in 3), and more ranges than tiles (empty ranges)."""
    q, *parts = make_case(QuantSpec("int4", 128), rank=4, bias=True)
    x = rand_x(GEMV_M)
    config = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=split_k, num_warps=4)
    assert relative_error(run_kernel(x, q, *parts, config=config), x, q, *parts) <= TOL[torch.float32]


def test_gemm_takes_few_rows_and_gemv_takes_sixteen():
    q, *parts = make_case(QuantSpec("nf3", 128), 4, True, True)
    x = rand_x(16)
    x_s = x / parts[2]
    t = x_s @ parts[1].T
    for kernel, rows in ((triton_gemm.qgemm, x[:3]), (triton_gemv.qgemv, x)):
        y = kernel(x_s[: len(rows)], q, t[: len(rows)], parts[0], parts[3])
        assert relative_error(y, rows, q, *parts) <= TOL[torch.float32]
    with pytest.raises(KernelInputError, match="at most 16 rows"):
        triton_gemv.qgemv(rand_x(17), q)


def test_dispatch_runs_the_kernels_on_any_leading_dims():
    q, *parts = make_case(QuantSpec("int4", 64), 4, True, True)
    x = torch.randn(3, 11, K)  # 33 rows: the GEMM
    y = qlinear(x, q, *parts, backend="triton")
    assert y.shape == (3, 11, N)
    assert relative_error(y.reshape(-1, N), x.reshape(-1, K), q, *parts) <= TOL[torch.float32]
    assert qlinear(x[:0], q, *parts, backend="triton").shape == (0, 11, N)
    auto = qlinear(x, q, *parts, backend="auto")  # CPU tensors: the reference
    assert torch.equal(auto, reference.qlinear(x, q, *parts))


def gpu(major, minor):
    """Stand-in device properties of a GPU of compute capability major.minor."""
    return SimpleNamespace(major=major, minor=minor)


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, torch.float32) == "reference"
    assert resolve_backend("triton", cpu, torch.bfloat16) == "triton"  # the interpreter
    with pytest.raises(BackendError, match="float64"):
        resolve_backend("triton", cpu, torch.float64)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: gpu(9, 0))
    assert resolve_backend("auto", cuda, torch.bfloat16) == "triton"
    assert resolve_backend("auto", cuda, torch.float64) == "reference"
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: gpu(7, 0))
    assert resolve_backend("auto", cuda, torch.float16) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1") as e:
        resolve_backend("triton", cpu, torch.float32)
    assert "\n" not in str(e.value)


def test_inputs_on_another_device_are_a_clear_error():
    q, *parts = make_case(QuantSpec("int4", 64), 4)
    q.codes = q.codes.to("meta")
    with pytest.raises(KernelInputError, match="codes is on meta"):
        triton_qlinear.qlinear(rand_x(2), q, *parts)


def test_op_compiles_and_differentiates_with_the_triton_backend():
    q, l1, l2, smooth, bias = make_case(QuantSpec("fp8_e4m3", None), 4, True, True)
    x = rand_x(GEMV_M).requires_grad_(True)
    g = torch.randn(GEMV_M, N)

    def f(x):
        return (qlinear(x, q, l1, l2, smooth, bias, backend="triton") * g).sum()

    loss = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    loss.backward()
    x_ref = x.detach().clone().requires_grad_(True)
    loss_ref = (reference.qlinear(x_ref, q, l1, l2, smooth, bias) * g).sum()
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_custom_op_passes_opcheck_with_the_triton_backend():
    q, l1, l2, smooth, bias = make_case(QuantSpec("int3", 64, double_quant=True), 4, True, True)
    x = rand_x(2).requires_grad_(True)
    s = q.spec
    spec = (s.format, s.group_size or 0, s.symmetric, s.scale_dtype, s.double_quant)
    fields = (q.codes, q.scales, q.zeros, q.dq_absmax)
    args = (x, *fields, l1, l2, smooth, bias, *spec, N, K, "triton")
    torch.library.opcheck(
        torch.ops.lowbit.qlinear.default, args, test_utils=("test_schema", "test_faketensor")
    )


def test_pruners_fit_the_problem(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = dict(M=20, N=4096, K=4096, PER_CHANNEL=False, GROUP_SIZE=64)
    gemm = triton_gemm.prune_gemm_configs(triton_gemm.GEMM_CONFIGS, args)
    assert gemm and all(c.kwargs["BLOCK_M"] <= 32 and 64 % c.kwargs["BLOCK_K"] == 0 for c in gemm)
    monkeypatch.setattr(triton_gemv, "_multiprocessors", lambda device: 132)
    gemv = triton_gemv.prune_gemv_configs(triton_gemv.GEMV_CONFIGS, dict(args, x_ptr=torch.empty(0)))
    assert gemv
    for c in gemv:
        kw = c.kwargs
        assert 64 % kw["BLOCK_K"] == 0 and kw["SPLIT_K"] <= 4096 // kw["BLOCK_K"]
        assert 4096 // kw["BLOCK_N"] * kw["SPLIT_K"] >= 132


def test_importing_lowbit_does_not_import_triton():
    code = "import sys, lowbit.kernels, lowbit.nn.qlinear; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# Compiles (TTIR -> PTX -> cubin with the ptxas bundled in the triton wheel) every kernel family for
# Ampere and Hopper without a GPU: the interpreter does not run the compiler, so this catches what only
# compiled code rejects. Runs in a fresh process, where TRITON_INTERPRET is unset.
COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowbit.kernels import triton_decode, triton_fused, triton_gemm, triton_gemv, triton_large, triton_w8a8

# pointer element types; every other pointer points to bf16 (activations, factors, bias, output)
POINTERS = dict(codes_ptr="*u8", scales_ptr="*u8", zeros_ptr="*u8", dq_absmax_ptr="*fp32", lut_ptr="*fp32",
                xq_ptr="*fp8e4nv", x_scale_ptr="*fp32", acc_ptr="*fp32")
INT3_DQ = dict(FMT="int", BITS=3, HAS_ZEROS=True, DOUBLE_QUANT=True, PER_CHANNEL=False, GROUP_SIZE=64,
               DQ_BLOCK=256, DQ_LEVELS=255, HAS_SMOOTH=True, HAS_LOWRANK=True, HAS_BIAS=True,
               DOT_PRECISION="tf32", BLOCK_R=16, lut_ptr=None)
NF4 = dict(INT3_DQ, FMT="nf", BITS=4, HAS_ZEROS=False, DOUBLE_QUANT=False, zeros_ptr=None, dq_absmax_ptr=None)
del NF4["lut_ptr"]  # NF reads its codebook


def compile_kernel(kernel, consts, arch, warps, pointers=POINTERS):
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig = {n: "constexpr" if n in consts else pointers.get(n, "*bf16") if n.endswith("_ptr") else "i32"
           for n in fn.arg_names}
    options = dict(num_warps=warps, num_stages=3)
    compiled = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32), options=options)
    assert compiled.asm["cubin"]


gemm_tile = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
for arch in (80, 90):
    compile_kernel(triton_gemm._qgemm_kernel, dict(INT3_DQ, **gemm_tile), arch, 4)
    for block_m in (1, 16):
        gemv_tile = dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4)
        compile_kernel(triton_gemv._qgemv_kernel, dict(NF4, **gemv_tile), arch, 4)
fp8 = dict(INT3_DQ, PER_CHANNEL=False, GROUP_SIZE=128, DOUBLE_QUANT=True, ROUND_IN_FP32=False, DOT_IEEE=False)
fp8_tile = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, BLOCK_R=64, T_PROGS=4, T_BLOCK_K=512)
W8A8_POINTERS = dict(POINTERS, codes_ptr="*u8", scales_ptr="*u8", inv_smooth_ptr="*fp32", ws_ptr="*fp32",
                     t_ptr="*fp32", lock_ptr="*i32")
compile_kernel(triton_w8a8._w8a8_kernel, dict(fp8, **fp8_tile), 90, 8, W8A8_POINTERS)
# the one-launch kernel of the other formats, every epilogue part
fused = dict(INT3_DQ, DOT_IEEE=False, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, BLOCK_R=64, SPLIT_K=4, T_PROGS=4,
             T_BLOCK_K=512)
for arch in (80, 90):
    compile_kernel(triton_fused._fused_kernel, fused, arch, 4, W8A8_POINTERS)
# the decode kernel, inline PTX included: 4-bit INT with every epilogue part, and NF4
DECODE = dict(FMT="int", BITS=4, EVEN_K=False, USE_ASM=True, MAGIC_VALUE=128, GROUP_SIZE=128, SCALE_W=False,
              HAS_SMOOTH=True, HAS_LOWRANK=True, HAS_BIAS=True, DOT_IEEE=False, BLOCK_M=16, BLOCK_N=128,
              TILE=128, BLOCK_R=64, SPLIT_K=4, T_PROGS=4, T_BLOCK_K=512, lut_ptr=None)
DECODE_POINTERS = dict(words_ptr="*i32", scales_ptr="*fp32", inv_smooth_ptr="*fp32", ws_ptr="*fp32",
                       lut_ptr="*i32", t_ptr="*fp32", lock_ptr="*i32")
NF_POINTERS = dict(DECODE_POINTERS, offsets_ptr="*i64")
for arch in (80, 90):
    compile_kernel(triton_decode._decode_kernel, DECODE, arch, 4, DECODE_POINTERS)
nf4 = dict(DECODE, FMT="nf", GROUP_SIZE=64, BLOCK_M=64, SCALE_W=True)
del nf4["lut_ptr"]
compile_kernel(triton_decode._decode_kernel, nf4, 90, 4, NF_POINTERS)
# 2-bit words (a tile of four groups) and 8-bit words (fp32 offsets)
compile_kernel(triton_decode._decode_kernel, dict(DECODE, BITS=2, GROUP_SIZE=64, TILE=256), 90, 4,
               DECODE_POINTERS)
compile_kernel(triton_decode._decode_kernel, dict(DECODE, BITS=8, BLOCK_N=256, BLOCK_M=32), 90, 8,
               dict(DECODE_POINTERS, offsets_ptr="*fp32"))
FP16 = {f"{name}_ptr": "*fp16" for name in ("x", "xs", "l1", "l2", "bias", "y")}  # fp16 activations
# 3-bit words (512-column tiles, weights scaled), 2-bit words with weights scaled, FP8 (E4M3 in bf16 and
# E5M2 in fp16, both architectures) and FP4 E2M1 through the pair table
compile_kernel(triton_decode._decode_kernel, dict(DECODE, BITS=3, GROUP_SIZE=64, TILE=512, BLOCK_M=64,
                                                  SCALE_W=True), 90, 4, DECODE_POINTERS)
compile_kernel(triton_decode._decode_kernel, dict(DECODE, BITS=2, GROUP_SIZE=64, TILE=256, BLOCK_M=64,
                                                  SCALE_W=True), 90, 4, DECODE_POINTERS)
for arch in (80, 90):
    compile_kernel(triton_decode._decode_kernel, dict(DECODE, FMT="fp8_e4m3", BITS=8), arch, 4,
                   dict(DECODE_POINTERS, offsets_ptr="*fp32"))
    compile_kernel(triton_decode._decode_kernel, dict(DECODE, FMT="fp8_e5m2", BITS=8), arch, 4,
                   dict(DECODE_POINTERS, offsets_ptr="*fp32", **FP16))
compile_kernel(triton_decode._decode_kernel, dict(nf4, GROUP_SIZE=32), 90, 4, NF_POINTERS)
fold = dict(INT3_DQ, BLOCK_N=64, BLOCK_K=64)
compile_kernel(triton_large._fold_kernel, fold, 90, 4, dict(POINTERS, inv_smooth_ptr="*fp32"))
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_ampere_and_hopper(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {
        "TRITON_CACHE_DIR": str(tmp_path)
    }
    out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "compiled", out.stderr[-3000:]
