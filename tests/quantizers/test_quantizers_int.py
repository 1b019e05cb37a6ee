"""Uniform integer formats: codes against a hand-written reference, ragged groups, SQNR floors."""

import pytest
import torch

from lowbit.quantizers import QuantSpec, dequantize, encode, fit_scales, quantize, unpack_codes


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return 10 * torch.log10(w.pow(2).sum() / (w - w_hat).pow(2).sum()).item()


@pytest.fixture(scope="module")
def gauss() -> torch.Tensor:
    return torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))


def reference_int4_asym_g128(w: torch.Tensor) -> torch.Tensor:
    """GPTQ-style min/max asymmetric INT4, one group at a time, fp16 scales."""
    out = torch.empty_like(w)
    for g0 in range(0, w.shape[1], 128):
        x = w[:, g0 : g0 + 128]
        lo = x.min(dim=1, keepdim=True).values.clamp(max=0)
        hi = x.max(dim=1, keepdim=True).values.clamp(min=0)
        s = ((hi - lo) / 15).half().float()
        z = torch.clamp(torch.round(-lo / s), 0, 15)
        c = torch.clamp(torch.round(x / s) + z, 0, 15)
        out[:, g0 : g0 + 128] = s * (c - z)
    return out


def reference_int_sym(w: torch.Tensor, bits: int, gs: int) -> torch.Tensor:
    half = 2 ** (bits - 1)
    out = torch.empty_like(w)
    for g0 in range(0, w.shape[1], gs):
        x = w[:, g0 : g0 + gs]
        s = (x.abs().max(dim=1, keepdim=True).values / (half - 1)).half().float()
        out[:, g0 : g0 + gs] = s * torch.clamp(torch.round(x / s), -half, half - 1)
    return out


@pytest.mark.parametrize("k", [1024, 576])
def test_int4_asym_g128_matches_reference(k):
    w = torch.randn(64, k, generator=torch.Generator().manual_seed(1))
    got = dequantize(quantize(w, QuantSpec("int4", 128, symmetric=False)))
    assert torch.equal(got, reference_int4_asym_g128(w))


@pytest.mark.parametrize("bits,fmt", [(2, "int2"), (3, "int3"), (4, "int4"), (8, "int8")])
def test_int_sym_matches_reference(bits, fmt):
    w = torch.randn(32, 320, generator=torch.Generator().manual_seed(2))
    got = dequantize(quantize(w, QuantSpec(fmt, 64, symmetric=True)))
    assert torch.equal(got, reference_int_sym(w, bits, 64))


@pytest.mark.parametrize("symmetric", [False, True])
def test_ragged_last_group_equals_standalone(symmetric):
    # K = 576, gs = 128: the last group (64 columns) must behave as if quantized on its own
    w = torch.randn(16, 576, generator=torch.Generator().manual_seed(3))
    w[:, 512:] = w[:, 512:].abs() + 0.5  # all positive: padding zeros would change an asymmetric range
    w[:, 512:] *= 1 if not symmetric else 0.01  # tiny: padding must not inflate the symmetric scale
    whole = dequantize(quantize(w, QuantSpec("int4", 128, symmetric)))
    alone = dequantize(quantize(w[:, 512:].contiguous(), QuantSpec("int4", None, symmetric)))
    assert torch.equal(whole[:, 512:], alone)


@pytest.mark.parametrize("fmt", ["int2", "int3", "int4", "int8"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("gs", [32, 128, 256, None])
def test_error_at_most_half_a_step(fmt, symmetric, gs):
    # fp32 scales: every in-range weight lies within s/2 of its reconstruction
    w = torch.randn(24, 600, generator=torch.Generator().manual_seed(4))
    spec = QuantSpec(fmt, gs, symmetric, scale_dtype="float32")
    s, z = fit_scales(w, spec)
    q = quantize(w, spec)
    err = (dequantize(q) - w).abs()
    step = s.repeat_interleave(gs or 600, dim=1)[:, :600]
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()
    codes = unpack_codes(q)
    assert int(codes.max()) < 2**spec.bits


@pytest.mark.parametrize(
    "spec", [QuantSpec("int4", 64), QuantSpec("int3", 128, True), QuantSpec("int8", None)]
)
def test_codes_are_self_consistent(spec):
    # re-encoding the reconstruction against the stored scales gives back the same codes
    w = torch.randn(40, 200, generator=torch.Generator().manual_seed(5)) * 0.02
    s, z = fit_scales(w, spec)
    q = quantize(w, spec)
    assert torch.equal(encode(dequantize(q), s, z, spec), unpack_codes(q))


def test_zero_and_constant_groups():
    w = torch.zeros(4, 128)
    w[1] = 0.3  # constant positive row: 0 and 0.3 must both be representable
    w[2] = -7.0
    for symmetric in (False, True):
        w_hat = dequantize(quantize(w, QuantSpec("int4", 64, symmetric)))
        assert torch.isfinite(w_hat).all()
        assert torch.allclose(w_hat, w, rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    "fmt,symmetric,gs,floor",
    [
        ("int2", False, 128, 5.8),
        ("int3", False, 128, 13.1),
        ("int4", False, 128, 19.7),
        ("int4", True, 128, 18.4),
        ("int4", False, None, 17.8),
        ("int4", False, 64, 20.6),
        ("int8", False, 128, 44.3),
        ("int8", True, None, 41.8),
    ],
)
def test_sqnr_on_gaussian(gauss, fmt, symmetric, gs, floor):
    # roughly 6 dB per bit; smaller groups gain from a tighter range
    got = sqnr_db(gauss, dequantize(quantize(gauss, QuantSpec(fmt, gs, symmetric))))
    assert floor <= got <= floor + 1.0, got


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 48, None])  # 48: a ragged last group of K = 200
def test_decode_in_place_equals_the_expression_bit_for_bit(symmetric, group_size):
    """decode forms s * (c - offset) in place: the same float32 products as the expression."""
    from lowbit.quantizers.groups import effective_group_size, expand_groups
    from lowbit.quantizers.integer import decode
    from lowbit.quantizers.quantize import decode_scales

    spec = QuantSpec("int4", group_size, symmetric=symmetric)
    q = quantize(torch.randn(16, 200, generator=torch.Generator().manual_seed(0)), spec)
    c, (s, z) = unpack_codes(q), decode_scales(q)
    gs = effective_group_size(spec, 200)
    offset = 8 if symmetric else expand_groups(z, 200, gs)
    assert torch.equal(decode(c, s, z, spec), expand_groups(s, 200, gs) * (c.float() - offset))
    s = s.clone().requires_grad_(True)  # a trained scale keeps its gradient
    decode(c, s, z, spec).sum().backward()
    assert s.grad is not None and s.grad.shape == s.shape
