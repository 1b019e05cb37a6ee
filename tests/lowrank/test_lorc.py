"""LoRC (lowbit.lowrank.lorc): Q = quantize(W), L1 L2 = SVD_r(W - Q); more rank never hurts."""

from itertools import pairwise

import pytest
import torch

from lowbit.lowrank import decompose
from lowbit.quantizers import QuantSpec, dequantize, quantize

SPECS = [
    QuantSpec("int3", 32),
    QuantSpec("nf4", 64),
    QuantSpec("fp4_e2m1", 32),
    QuantSpec("fp8_e5m2", None),
    QuantSpec("int2", 64, double_quant=True),
]


def weight(n: int = 96, k: int = 160, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_more_rank_is_never_worse(spec):
    W = weight()
    errs = [decompose(W, spec, r, "lorc").info["frobenius_error"] for r in (0, 1, 2, 4, 8, 16)]
    assert all(a >= b for a, b in pairwise(errs))
    assert errs[-1] < errs[0]


@pytest.mark.parametrize("spec", SPECS[:3], ids=lambda s: s.short())
def test_lowrank_part_is_the_best_fit_of_the_quantization_error(spec):
    W = weight()
    E = W - dequantize(quantize(W, spec))
    S = torch.linalg.svdvals(E.double())
    d = decompose(W, spec, 8, "lorc")
    assert d.info["frobenius_error"] == pytest.approx(float(S[8:].square().sum()), rel=1e-4)
    torch.testing.assert_close(d.weight(), dequantize(d.q) + d.l1 @ d.l2)


def test_rank_zero_is_plain_quantization():
    W, spec = weight(), QuantSpec("nf4", 64)
    d = decompose(W, spec, 0, "lorc")
    assert d.l1 is None and d.l2 is None and d.smooth is None
    assert torch.equal(d.q.codes, quantize(W, spec).codes)
    assert d.info["frobenius_error"] == decompose(W, spec, 0, "none").info["frobenius_error"]


def test_gptq_rounding_lowers_the_output_error():
    g = torch.Generator().manual_seed(1)
    W = weight()
    Z = torch.randn(512, 8, generator=g)
    X = Z @ torch.randn(8, 160, generator=g) + 0.2 * torch.randn(512, 160, generator=g)
    H = X.T @ X
    spec = QuantSpec("int3", 32)
    nearest = decompose(W, spec, 4, "lorc", H=H)
    ours = decompose(W, spec, 4, "lorc", H=H, rounding="gptq")
    assert ours.info["output_error"] < 0.8 * nearest.info["output_error"]
