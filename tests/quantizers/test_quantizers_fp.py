"""Minifloat formats: FP8 codes are torch's float8 casts, FP4 E2M1 is the nearest value, SQNR floors."""

import pytest
import torch

from lowbit.quantizers import QuantSpec, codebook, dequantize, fit_scales, quantize, unpack_codes

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return 10 * torch.log10(w.pow(2).sum() / (w - w_hat).pow(2).sum()).item()


@pytest.fixture(scope="module")
def gauss() -> torch.Tensor:
    return torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "fmt,dtype,fmax", [("fp8_e4m3", torch.float8_e4m3fn, 448.0), ("fp8_e5m2", torch.float8_e5m2, 57344.0)]
)
@pytest.mark.parametrize("gs", [64, None])
def test_fp8_codes_are_float8_bits(fmt, dtype, fmax, gs):
    w = torch.randn(32, 448, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(fmt, gs)
    s, _ = fit_scales(w, spec)
    ref_s = w.view(32, -1, gs or 448).abs().amax(dim=2) / fmax
    assert torch.equal(s, ref_s.half().float())
    x = (w.view(32, -1, gs or 448) / s[..., None]).view_as(w)
    codes = unpack_codes(quantize(w, spec))
    assert torch.equal(codes, x.clamp(-fmax, fmax).to(dtype).view(torch.uint8))
    assert torch.equal(
        dequantize(quantize(w, spec)), codes.view(dtype).float() * s.repeat_interleave(gs or 448, 1)
    )


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float16"])
def test_saturates_instead_of_overflowing(fmt, scale_dtype):
    # coarse scale rounding can leave |w| / s above fmax: the value must clamp, never become NaN/Inf
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 3
    w_hat = dequantize(quantize(w, QuantSpec(fmt, 32, scale_dtype=scale_dtype)))
    assert torch.isfinite(w_hat).all()
    assert (w_hat.abs() <= w.abs().amax() * 1.01).all()


def test_fp4_codebook():
    cb = codebook("fp4_e2m1")
    assert cb.tolist() == E2M1 + [-v for v in E2M1]


def test_fp4_is_nearest_value():
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(3))
    spec = QuantSpec("fp4_e2m1", 32, scale_dtype="float32")
    s, _ = fit_scales(w, spec)
    assert torch.allclose(s, w.view(16, -1, 32).abs().amax(dim=2) / 6)
    x = (w.view(16, -1, 32) / s[..., None]).view_as(w)
    values = torch.tensor(E2M1 + [-v for v in E2M1])
    best = (x[..., None] - values).abs().amin(dim=-1)
    codes = unpack_codes(quantize(w, spec))
    assert torch.allclose((x - values[codes.long()]).abs(), best, atol=1e-6)
    assert int(codes.max()) <= 15 and not (codes == 8).any()  # no negative zero
    assert torch.equal(codes >= 8, x < -0.25)


def test_fp8_codebook_matches_dtype():
    cb = codebook("fp8_e4m3")
    assert cb.shape == (256,) and cb[126] == 448 and cb[0x38] == 1.0
    assert codebook("fp8_e5m2")[0x7B] == 57344


@pytest.mark.parametrize(
    "fmt,gs,floor",
    [
        ("fp8_e4m3", 128, 31.5),
        ("fp8_e4m3", None, 31.3),
        ("fp8_e5m2", 128, 25.5),
        ("fp4_e2m1", 128, 19.0),
        ("fp4_e2m1", 32, 19.7),
    ],
)
def test_sqnr_on_gaussian(gauss, fmt, gs, floor):
    # FP8 error is relative (about 31 dB for 3 mantissa bits, 25 dB for 2), nearly independent of the group
    got = sqnr_db(gauss, dequantize(quantize(gauss, QuantSpec(fmt, gs))))
    assert floor <= got <= floor + 1.0, got


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp4_e2m1"])
def test_double_quant_costs_little(gauss, fmt):
    plain = sqnr_db(gauss, dequantize(quantize(gauss, QuantSpec(fmt, 64))))
    dq = sqnr_db(gauss, dequantize(quantize(gauss, QuantSpec(fmt, 64, double_quant=True))))
    assert plain - dq < 0.1
