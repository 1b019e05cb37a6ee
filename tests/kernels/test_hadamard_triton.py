"""The Triton online Hadamard transform against the reference, alone and inside a QLinear on the Triton
backend, run on CPU tensors by Triton's interpreter (see tests/kernels/test_kernels_triton.py for why the
variable is set before any import and when the tests run in a fresh process); and its compilation for
Ampere and Hopper."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lowbit.kernels import reference, triton_hadamard  # noqa: E402
from lowbit.kernels.dispatch import hadamard_transform  # noqa: E402
from lowbit.nn.qlinear import QLinear, add_online_hadamard  # noqa: E402
from lowbit.quantizers import QuantSpec, quantize  # noqa: E402
from tests.kernels.test_kernels_triton import run_in_a_fresh_process, skip_without_the_interpreter  # noqa: E402

OWN = {"test_in_a_fresh_process", "test_kernel_compiles_for_ampere_and_hopper"}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _needs_the_interpreter(request):
    skip_without_the_interpreter(request, OWN)


def test_in_a_fresh_process():
    run_in_a_fresh_process(__file__)


@pytest.mark.parametrize("n", [1, 2, 8, 20, 160, 576, 1536])
@pytest.mark.parametrize("dtype", list(TOL))
def test_triton_transform_equals_the_reference(n, dtype):
    x = torch.randn(5, 3, n, generator=torch.Generator().manual_seed(n)).to(dtype)
    want = reference.hadamard_transform(x.double())
    got = triton_hadamard.hadamard_transform(x)
    assert got.dtype == dtype and got.shape == x.shape
    assert float((got.double() - want).abs().max()) <= TOL[dtype] * float(want.abs().max())


def test_large_dense_orders_and_gradients_take_the_torch_transform():
    x = torch.randn(2, 224 * 64)  # m = 224 > MAX_DENSE
    assert torch.allclose(triton_hadamard.hadamard_transform(x), reference.hadamard_transform(x), atol=1e-5)
    x = torch.randn(3, 160, requires_grad=True)
    hadamard_transform(x, "triton").sum().backward()  # autograd through the reference
    assert x.grad is not None


@pytest.mark.parametrize("M", [1, 5, 33])
@pytest.mark.parametrize("K", [160, 576])
def test_triton_backend_applies_the_online_transform_like_the_reference(M, K):
    g = torch.Generator().manual_seed(K + M)
    linear = torch.nn.Linear(K, 83, bias=True)
    q = quantize(torch.randn(83, K, generator=g), QuantSpec("int4", 32))
    plain = QLinear.from_linear(linear, q, backend="reference")
    add_online_hadamard(linear)
    ref, tri = (QLinear.from_linear(linear, q, backend=b) for b in ("reference", "triton"))
    assert ref.hadamard and tri.hadamard and not plain.hadamard
    x = torch.randn(M, K, generator=g)
    want, got = ref(x), tri(x)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    assert not torch.allclose(plain(x), want, atol=1e-3)  # the transform is applied


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowbit.kernels import triton_hadamard

for arch in (80, 90):
    for m, block, p, dt in ((12, 16, 128, "*bf16"), (1, 1, 8192, "*fp16"), (5, 8, 32, "*fp32")):
        consts = dict(M_PART=m, BLOCK_I=block, P=p, LOG_P=p.bit_length() - 1)
        sig = dict(x_ptr=dt, h_ptr="*fp32", y_ptr=dt, stride_xm="i32", stride_ym="i32", scale="fp32")
        sig.update({k: "constexpr" for k in consts})
        src = ASTSource(triton_hadamard._hadamard_kernel, sig, consts)
        assert triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4)).asm["cubin"]
print("compiled")
"""


def test_kernel_compiles_for_ampere_and_hopper(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {
        "TRITON_CACHE_DIR": str(tmp_path)
    }
    out = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "compiled", out.stderr[-3000:]
