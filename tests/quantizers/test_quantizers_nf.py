"""NormalFloat: the QLoRA codebook, codes against a hand-written reference, SQNR, NF4 vs INT4."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from lowbit.quantizers import (
    QuantSpec,
    codebook,
    decode_scales,
    dequantize,
    fit_scales,
    quantize,
    unpack_codes,
)
from lowbit.quantizers.nf import nearest_index, nf_codebook, nf_offset

# QLoRA appendix E / bitsandbytes' NF4 table
NF4_PUBLISHED = [
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0,
]  # fmt: skip


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return 10 * torch.log10(w.pow(2).sum() / (w - w_hat).pow(2).sum()).item()


@pytest.fixture(scope="module")
def gauss() -> torch.Tensor:
    return torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))


def test_nf4_matches_published_table():
    assert nf_offset(4) == pytest.approx(0.9677, abs=1e-4)
    assert torch.allclose(nf_codebook(4), torch.tensor(NF4_PUBLISHED), atol=1e-4, rtol=0)
    assert torch.equal(codebook("nf4"), nf_codebook(4))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_codebook_shape(bits):
    cb = nf_codebook(bits)
    assert cb.shape == (2**bits,) and cb[0] == -1 and cb[-1] == 1
    assert (cb[1:] > cb[:-1]).all()
    assert int((cb == 0).sum()) == 1 and int((cb > 0).sum()) == 2 ** (bits - 1)


def test_nf2_closed_form():
    off = nf_offset(2)
    inner = norm.ppf((off + 0.5) / 2) / norm.ppf(off)
    assert torch.allclose(nf_codebook(2), torch.tensor([-1.0, 0.0, float(inner), 1.0]), atol=1e-7)


def test_nearest_index_is_argmin():
    cb = nf_codebook(3)
    x = torch.linspace(-1.2, 1.2, 4001)
    brute = (x[:, None] - cb[None, :]).abs().argmin(dim=1)
    assert torch.equal(nearest_index(x, cb).long(), brute)


def reference_nf4_g64(w: torch.Tensor) -> torch.Tensor:
    """absmax per block of 64, fp16 scale, nearest NF4 value by brute force."""
    offset = 0.5 * (29 / 30 + 31 / 32)
    v = np.concatenate(
        [norm.ppf(np.linspace(offset, 0.5, 9)[:-1]), [0.0], -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])]
    )
    cb = torch.tensor(np.sort(v) / v.max(), dtype=torch.float32)
    xg = w.view(w.shape[0], -1, 64)
    s = xg.abs().amax(dim=2, keepdim=True).half().float()
    c = ((xg / s)[..., None] - cb).abs().argmin(dim=-1)
    return (s * cb[c]).view_as(w)


def test_nf4_g64_matches_reference():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    got = dequantize(quantize(w, QuantSpec("nf4", 64)))
    assert torch.equal(got, reference_nf4_g64(w))


def test_ragged_group_uses_only_real_columns():
    w = torch.randn(8, 200, generator=torch.Generator().manual_seed(2))
    w[:, 192:] *= 1e-3
    whole = dequantize(quantize(w, QuantSpec("nf3", 64)))
    alone = dequantize(quantize(w[:, 192:].contiguous(), QuantSpec("nf3", None)))
    assert torch.equal(whole[:, 192:], alone)


@pytest.mark.parametrize(
    "fmt,gs,floor",
    [("nf2", 64, 4.8), ("nf3", 64, 13.9), ("nf4", 64, 20.5), ("nf4", 128, 20.2), ("nf4", None, 19.4)],
)
def test_sqnr_on_gaussian(gauss, fmt, gs, floor):
    got = sqnr_db(gauss, dequantize(quantize(gauss, QuantSpec(fmt, gs))))
    assert floor <= got <= floor + 1.0, got


@pytest.mark.parametrize("gs", [64, 128])
def test_nf4_beats_int4_symmetric_on_gaussian(gauss, gs):
    nf4 = sqnr_db(gauss, dequantize(quantize(gauss, QuantSpec("nf4", gs))))
    int4 = sqnr_db(gauss, dequantize(quantize(gauss, QuantSpec("int4", gs, symmetric=True))))
    assert nf4 > int4 + 0.5


def test_double_quant_costs_under_a_tenth_of_a_db(gauss):
    plain = sqnr_db(gauss, dequantize(quantize(gauss, QuantSpec("nf4", 64))))
    dq = sqnr_db(gauss, dequantize(quantize(gauss, QuantSpec("nf4", 64, double_quant=True))))
    assert plain - dq < 0.1


def test_double_quant_scales_round_trip_exactly():
    w = torch.randn(300, 320, generator=torch.Generator().manual_seed(3))
    spec = QuantSpec("nf4", 64, double_quant=True)
    s, _ = fit_scales(w, spec)
    q = quantize(w, spec)
    assert q.scales.dtype == torch.uint8 and q.dq_absmax.shape == (-(-300 * 5 // 256),)
    assert torch.equal(decode_scales(q)[0], s)
    q2 = quantize(dequantize(q), spec)  # re-quantizing the reconstruction changes nothing
    assert torch.equal(q2.scales, q.scales) and torch.equal(q2.dq_absmax, q.dq_absmax)
    assert torch.equal(unpack_codes(q2), unpack_codes(q))
