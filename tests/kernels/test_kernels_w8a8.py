"""FP8 W8A8 (per-token FP8 activations) against its definition and the reference, under Triton's
interpreter (in a fresh process when TRITON_INTERPRET=1 did not take effect here, see
test_kernels_triton): the one-launch kernel, the torch._scaled_mm alternative, the backends."""

import pytest
import torch

from tests.kernels.test_kernels_triton import (
    GEMM_M,
    GEMV_M,
    TOL,
    K,
    N,
    make_case,
    rand_x,
    relative_error,
    run_in_a_fresh_process,
    skip_without_the_interpreter,
)

triton = pytest.importorskip("triton")

from lowbit.kernels import qlinear, reference, triton_fp8, triton_splitk, triton_w8a8  # noqa: E402
from lowbit.kernels.trace import count_launches  # noqa: E402
from lowbit.quantizers import QuantSpec  # noqa: E402


@pytest.fixture(autouse=True)
def _needs_the_interpreter(request):
    skip_without_the_interpreter(request, {"test_in_a_fresh_process"})


def test_in_a_fresh_process():
    run_in_a_fresh_process(__file__)


def definition(x, q, l1, l2, smooth, bias):
    """float64: the reference on the per-token FP8 activations plus the unquantized low-rank term, with
    the one-launch kernel's arithmetic: x_s = x * (1 / smooth), x_q = E4M3(x_s * (1 / s_x)) (the
    division of `quantize_activations` may round the other way where x_s / s_x lies within an fp32
    ulp of an E4M3 midpoint)."""
    x_s = x if smooth is None else (x.float() * (1.0 / smooth.float())).to(x.dtype)
    _, s_x = triton_fp8.quantize_activations(x_s)
    x_q = (x_s.float() * (1.0 / s_x)[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    x_hat = x_q.double() * s_x.double()[:, None]
    y = reference.qlinear(x_hat, q, bias=None if bias is None else bias.double())
    return y if l1 is None else y + (x_s.double() @ l2.double().T) @ l1.double().T


W8A8_CASES = [  # (spec, dtype, M, rank, smooth, bias)
    (QuantSpec("fp8_e4m3", None), torch.float32, GEMM_M, 4, True, True),
    (QuantSpec("fp8_e4m3", 64), torch.float32, GEMM_M, 0, False, True),
    (QuantSpec("fp8_e4m3", 96, double_quant=True), torch.float16, GEMM_M, 4, False, False),  # K tiles of 32
    (QuantSpec("fp8_e4m3", 128), torch.float32, 260, 4, True, False),  # 128 x 256 tiles, no split
]


@pytest.mark.parametrize("impl", list(triton_w8a8.IMPLS))
@pytest.mark.parametrize("spec, dtype, m, rank, smooth, bias", W8A8_CASES, ids=str)
def test_w8a8_equals_its_definition(impl, spec, dtype, m, rank, smooth, bias):
    """To fp32 rounding (fused, fp32), else to the output's rounding (fp16; torch._scaled_mm's row-wise
    scaling writes bf16); within FP8 activation error of the reference; the scratch is left zeroed."""
    q, l1, l2, s, b = make_case(spec, rank, smooth, bias, dtype)
    if impl == "scaled_mm" and not triton_w8a8.scaled_mm_applies(q):
        pytest.skip("torch._scaled_mm takes per-channel scales only")
    x = rand_x(m, dtype)
    y = triton_w8a8.IMPLS[impl](x, q, l1, l2, None if s is None else 1.0 / s.float(), b)
    want = definition(x, q, l1, l2, s, b)
    bound = 1e-5 if impl == "fused" and dtype == torch.float32 else 5e-3
    assert float((y.double() - want).abs().max() / want.abs().max()) <= bound
    assert 0 < relative_error(y, x, q, l1, l2, s, b) <= 0.06
    ws, t, lock = triton_splitk.scratch(x.device, N)
    assert not ws.any() and not t.any() and not lock.any()


def test_interpreter_rounds_activations_to_nearest_even():
    """The one-launch kernel's activations are `quantize_activations`'s, ties and carries included:
    one-hot rows of W read x_q * s_x back (fp32 activations, per-channel scale 1 not assumed)."""
    q, *_ = make_case(QuantSpec("fp8_e4m3", None), dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    # values on and between E4M3 steps: ties to even, roundings that carry into the next binade
    x = torch.randn(GEMM_M, q.shape[1], generator=g) * 2.0 ** torch.randint(-8, 8, (GEMM_M, 1), generator=g)
    y = triton_w8a8.w8a8_fused(x, q, None, None, None, None)
    assert float((y.double() - definition(x, q, None, None, None, None)).abs().max()) <= 1e-5 * float(
        y.abs().max()
    )


def test_w8a8_backends_apply_only_where_they_can():
    assert triton_fp8.fp8_dot_supported(torch.device("cpu"))
    fp8, int4 = make_case(QuantSpec("fp8_e4m3", 64), 4, True, True), make_case(QuantSpec("int4", 64), 4)
    assert triton_fp8.w8a8_applies(fp8[0], torch.device("cpu"))
    assert not triton_fp8.w8a8_applies(int4[0], torch.device("cpu"))
    assert not triton_fp8.w8a8_applies(make_case(QuantSpec("fp8_e4m3", 40))[0], torch.device("cpu"))
    x = rand_x(GEMV_M)  # decode sizes: the exact weight-only kernel
    assert relative_error(qlinear(x, *fp8, backend="triton_w8a8"), x, *fp8) <= TOL[torch.float32]
    x = rand_x(GEMM_M)
    for backend in ("triton_w8a8", "triton_w8a8_scaled_mm"):  # group scales: the one-launch kernel
        assert 0 < relative_error(qlinear(x, *fp8, backend=backend), x, *fp8) <= 0.06
    assert torch.equal(qlinear(x, *int4, backend="triton_w8a8"), qlinear(x, *int4, backend="triton"))


@pytest.mark.parametrize("m", [GEMV_M, GEMM_M])
def test_w8a8_is_one_launch(m):
    from lowbit.kernels import triton_qlinear

    q, *parts = make_case(QuantSpec("fp8_e4m3", None), 4, False, True, torch.bfloat16)
    x = rand_x(m, torch.bfloat16)
    y = triton_qlinear.qlinear_w8a8(x, q, *parts)
    assert relative_error(y, x, q, *parts) <= (TOL[torch.bfloat16] if m == GEMV_M else 0.06)
    assert count_launches(lambda: triton_qlinear.qlinear_w8a8(x, q, *parts)) == 1


def test_activation_quantization_is_per_token():
    x = torch.randn(4, K) * torch.tensor([1e-3, 1.0, 1e3, 0.0])[:, None]
    x_q, s_x = triton_fp8.quantize_activations(x)
    assert x_q.dtype == torch.float8_e4m3fn and s_x.shape == (4,)
    amax = x_q.float().abs().amax(dim=1)
    assert torch.equal(amax[:3], torch.full((3,), 448.0)) and amax[3] == 0
    # E4M3 steps are at most 32 (the binade [256, 448]): nearest rounding errs by at most 16 s_x
    err = (x_q.float() * s_x[:, None] - x).abs()
    assert bool((err <= 16 * s_x[:, None] * (1 + 1e-6)).all())
    assert float(err[1].max()) > 0.5 * 16 * float(s_x[1])  # the bound is not vacuous


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_activation_quantization_equals_its_definition(dtype):
    """One launch computes quantize_activations: the same scales and codes, but for the interpreter's
    fp32 -> E4M3 conversion, which rounds ties away from zero (one step off) and drops the carry of a
    rounding up to a power of two (half of it); compiled code rounds to nearest even."""
    g = torch.Generator().manual_seed(1)  # a seed whose row 1 rounds to E4M3's smallest subnormal
    x = (torch.randn(5, K, generator=g) * torch.tensor([1e-3, 1.0, 1e3, 0.0, 7.0])[:, None]).to(dtype)
    want, s_want = triton_fp8.quantize_activations(x)
    got, s_got = triton_fp8.quantize_activations_fused(x)
    assert torch.equal(s_got, s_want)
    a, b = want.float(), got.float()
    # E4M3 spacing: 2^(e - 3) for normals, 2^-9 below the smallest normal 2^-6 (subnormals)
    step = 2.0 ** (torch.maximum(a.abs(), b.abs()).clamp(min=2**-6).log2().floor() - 3)
    carry_dropped = (b == a / 2) & (a.abs().log2() == a.abs().log2().round())
    assert bool(((a - b).abs() <= step).logical_or(carry_dropped).all())
    assert (a == b).float().mean() > 0.9
