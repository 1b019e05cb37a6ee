"""A QLinear with the online Hadamard transform on the Triton backend against the reference backend, run
on CPU tensors by Triton's interpreter (see tests/kernels/test_kernels_triton.py for why the variable is
set before any import and when the tests run in a fresh process)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lowbit.nn.qlinear import QLinear, add_online_hadamard  # noqa: E402
from lowbit.quantizers import QuantSpec, quantize  # noqa: E402
from tests.kernels.test_kernels_triton import run_in_a_fresh_process, skip_without_the_interpreter  # noqa: E402

OWN = {"test_in_a_fresh_process"}


@pytest.fixture(autouse=True)
def _needs_the_interpreter(request):
    skip_without_the_interpreter(request, OWN)


def test_in_a_fresh_process():
    run_in_a_fresh_process(__file__)


@pytest.mark.parametrize("M", [1, 5, 33])
@pytest.mark.parametrize("K", [160, 576])
def test_triton_backend_applies_the_online_transform_like_the_reference(M, K):
    g = torch.Generator().manual_seed(K + M)
    N = 83
    linear = torch.nn.Linear(K, N, bias=True)
    q = quantize(torch.randn(N, K, generator=g), QuantSpec("int4", 32))
    plain = QLinear.from_linear(linear, q, backend="reference")
    add_online_hadamard(linear)
    ref, tri = (QLinear.from_linear(linear, q, backend=b) for b in ("reference", "triton"))
    assert ref.hadamard and tri.hadamard and not plain.hadamard
    x = torch.randn(M, K, generator=g)
    want, got = ref(x), tri(x)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    assert not torch.allclose(plain(x), want, atol=1e-3)  # the transform is applied
