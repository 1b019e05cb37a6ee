"""The reference quantized linear and the backend dispatch / `lowbit::qlinear` op."""

import pytest
import torch

from lowbit.kernels import BACKENDS, BackendError, KernelInputError, qlinear, reference
from lowbit.quantizers import QuantInputError, QuantSpec, dequantize, quantize
from lowbit.quantizers.hadamard import online_matrix

SPECS = [
    QuantSpec("int4", 32),
    QuantSpec("int3", 64, symmetric=True),
    QuantSpec("nf4", 64, double_quant=True),
    QuantSpec("fp8_e4m3", None),
    QuantSpec("fp4_e2m1", 32, scale_dtype="bfloat16"),
]
N, K, R = 24, 72, 3  # K = 72: ragged last group for group size 32 and 64


def parts(spec, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = quantize(torch.randn(N, K, generator=g), spec)
    l1 = (0.1 * torch.randn(N, R, generator=g)).to(dtype)
    l2 = (0.1 * torch.randn(R, K, generator=g)).to(dtype)
    smooth = (0.5 + torch.rand(K, generator=g)).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    return q, l1, l2, smooth, bias


def effective_weight(q, l1, l2, smooth):
    """The dense weight the layer applies to x: (W + L1 L2) with column k divided by smooth[k]."""
    W = dequantize(q, torch.float64) + l1.double() @ l2.double()
    return W / smooth.double()[None, :]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_reference_equals_dense_linear_with_effective_weight(spec):
    q, l1, l2, smooth, bias = parts(spec)
    x = torch.randn(2, 5, K, dtype=torch.float64)
    y = reference.qlinear(x, q, l1.double(), l2.double(), smooth.double(), bias.double())
    expected = torch.nn.functional.linear(x, effective_weight(q, l1, l2, smooth), bias.double())
    assert y.shape == (2, 5, N)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


def test_optional_parts_each_change_the_output_and_none_reduce_to_plain_matmul():
    q, l1, l2, smooth, bias = parts(SPECS[0])
    x = torch.randn(7, K, dtype=torch.float64)
    W = dequantize(q, torch.float64)
    torch.testing.assert_close(reference.qlinear(x, q), x @ W.T)
    torch.testing.assert_close(reference.qlinear(x, q, bias=bias.double()), x @ W.T + bias.double())
    torch.testing.assert_close(reference.qlinear(x, q, smooth=smooth.double()), (x / smooth.double()) @ W.T)
    low = reference.qlinear(x, q, l1.double(), l2.double())
    torch.testing.assert_close(low, x @ (W + l1.double() @ l2.double()).T)
    assert not torch.allclose(low, x @ W.T)


def test_leading_dims_are_rows():
    q, l1, l2, smooth, bias = parts(SPECS[2])
    x = torch.randn(3, 4, K)
    y = reference.qlinear(x, q, l1, l2, smooth, bias)
    rows = torch.stack([reference.qlinear(r, q, l1, l2, smooth, bias) for r in x.reshape(-1, K)])
    torch.testing.assert_close(y.reshape(-1, N), rows)
    assert reference.qlinear(x[0, 0], q).shape == (N,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_computes_in_input_dtype(dtype):
    q, l1, l2, smooth, bias = parts(SPECS[0])
    x = torch.randn(5, K)
    y = reference.qlinear(x.to(dtype), q, l1, l2, smooth, bias)  # fp32 factors, low-precision input
    assert y.dtype == dtype
    y32 = reference.qlinear(x, q, l1, l2, smooth, bias)
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.1)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.randn(2, K + 1)), "features"),
        (dict(x=torch.ones(2, K, dtype=torch.int64)), "floating point"),
        (dict(l2=None), "both low-rank"),
        (dict(l2=torch.randn(R + 1, K)), "low-rank factors"),
        (dict(smooth=torch.ones(K - 1)), "smoothing"),
        (dict(bias=torch.ones(N + 1)), "bias"),
    ],
)
@pytest.mark.parametrize("fn", [reference.qlinear, qlinear], ids=["reference", "dispatch"])
def test_bad_inputs_raise_one_line_value_errors(fn, change, match):
    q, l1, l2, smooth, bias = parts(SPECS[0])
    args = dict(x=torch.randn(2, K), l1=l1, l2=l2, smooth=smooth, bias=bias) | change
    with pytest.raises(KernelInputError, match=match) as e:
        fn(args.pop("x"), q, **args)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_dispatch_auto_and_reference_equal_the_reference_exactly():
    assert "reference" in BACKENDS
    q, l1, l2, smooth, bias = parts(SPECS[3])
    x = torch.randn(4, 3, K)
    expected = reference.qlinear(x, q, l1, l2, smooth, bias)
    for backend in ("auto", "reference"):
        assert torch.equal(qlinear(x, q, l1, l2, smooth, bias, backend=backend), expected)


def test_unknown_backend_is_a_clear_error():
    q = parts(SPECS[0])[0]
    with pytest.raises(BackendError, match="unknown qlinear backend 'cuda-magic'"):
        qlinear(torch.randn(1, K), q, backend="cuda-magic")


def op_args(q, x, l1, l2, smooth, bias):
    s = q.spec
    spec = (s.format, s.group_size or 0, s.symmetric, s.scale_dtype, s.double_quant)
    return (x, q.codes, q.scales, q.zeros, q.dq_absmax, l1, l2, smooth, bias, *spec, N, K, "reference")


def test_custom_op_passes_opcheck():
    q, l1, l2, smooth, bias = parts(SPECS[0], dtype=torch.float64)
    x = torch.randn(3, K, dtype=torch.float64, requires_grad=True)
    for t in (l1, l2, smooth, bias):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.lowbit.qlinear.default, op_args(q, x, l1, l2, smooth, bias))


@pytest.mark.parametrize("spec", SPECS[:3], ids=lambda s: s.short())
def test_op_gradients_equal_autograd_through_the_reference(spec):
    q, *factors = parts(spec, seed=1, dtype=torch.float64)
    x = torch.randn(2, 3, K, dtype=torch.float64)
    g = torch.randn(2, 3, N, dtype=torch.float64)
    grads = []
    for fn in (qlinear, reference.qlinear):
        leaves = [t.clone().requires_grad_(True) for t in (x, *factors)]
        fn(leaves[0], q, *leaves[1:]).backward(g)
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_op_traces_under_torch_compile():
    q, l1, l2, smooth, bias = parts(SPECS[1])
    x = torch.randn(5, K)

    def f(x):
        return qlinear(x, q, l1, l2, smooth, bias).relu()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))


@pytest.mark.parametrize("n", [1, 2, 8, 20, 160, 576, 1536])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hadamard_transform_equals_the_dense_hadamard_matmul(n, dtype):
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    got = reference.hadamard_transform(x.to(dtype))
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(got.double(), x @ online_matrix(n), atol=tol * float(x.abs().max()) * n**0.5)


def test_hadamard_transform_refuses_an_order_it_cannot_build():
    with pytest.raises(QuantInputError, match="order 36"):
        reference.hadamard_transform(torch.ones(2, 36))
