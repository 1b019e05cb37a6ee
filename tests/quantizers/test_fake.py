"""Fake quantization: forward equal to the stored model, LSQ / STE gradients, PEQA, requantize."""

import math

import pytest
import torch

from lowbit.quantizers import (
    QuantInputError,
    QuantSpec,
    decode,
    decode_scales,
    dequantize,
    encode,
    fit_scales,
    quantize,
    unpack_codes,
)
from lowbit.quantizers.fake import (
    fake_quantize,
    grad_scale,
    lsq_grad_scale,
    peqa_dequantize,
    positive_levels,
    project_to_codes,
    requantize,
    round_ste,
    stored_scales,
)
from lowbit.quantizers.groups import expand_groups, round_scales

SPECS = [
    QuantSpec("int4", 32),
    QuantSpec("int3", 64, symmetric=True),  # K = 72: ragged last group
    QuantSpec("int2", None, scale_dtype="float32"),
    QuantSpec("int8", 32),
    QuantSpec("nf4", 32, double_quant=True),
    QuantSpec("nf3", 64, scale_dtype="bfloat16"),
    QuantSpec("fp8_e4m3", None),
    QuantSpec("fp8_e5m2", 32, scale_dtype="float32"),
    QuantSpec("fp4_e2m1", 32),
]
N, K = 24, 72


def weight(seed=0):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


def group_sums(x, gs):
    """Sum of x [N, K] over the columns of each group: [N, G]."""
    return torch.stack([x[:, a : a + gs].sum(1) for a in range(0, x.shape[1], gs)], 1)


def scales(w, spec, factor=1.0):
    s, z = fit_scales(w, spec)
    return (s * factor).requires_grad_(), None if z is None else z.clone().requires_grad_()


def test_round_ste_and_grad_scale():
    x = torch.tensor([0.2, 1.7, -2.5], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    x.grad = None
    y = grad_scale(x, 0.25)
    assert torch.equal(y, x.detach())
    (3 * y).sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), 0.75))


def test_lsq_grad_scale_is_one_over_sqrt_group_size_times_positive_levels():
    assert positive_levels(QuantSpec("int4", 32)) == 15
    assert positive_levels(QuantSpec("int4", 32, symmetric=True)) == 7
    assert positive_levels(QuantSpec("nf4", 64)) == 8
    assert positive_levels(QuantSpec("fp4_e2m1", 32)) == 7
    assert positive_levels(QuantSpec("fp8_e4m3", None)) == 126  # 127 positive patterns, one is NaN
    assert lsq_grad_scale(QuantSpec("int4", 32), 72) == pytest.approx(1 / math.sqrt(32 * 15))
    assert lsq_grad_scale(QuantSpec("int3", None, symmetric=True), 72) == pytest.approx(1 / math.sqrt(72 * 3))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
@pytest.mark.parametrize("factor", [1.0, 0.7, 1.3])
def test_forward_is_exactly_the_requantized_weight(spec, factor):
    w = weight()
    s, z = scales(w, spec, factor)
    w_hat = fake_quantize(w, s, z, spec)
    assert torch.equal(w_hat.detach(), dequantize(requantize(w, s, z, spec)))
    if factor == 1.0:  # round-to-nearest scales: the plain quantizer's result
        assert torch.equal(w_hat.detach(), dequantize(quantize(w, spec)))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_scales_get_nonzero_gradients_for_every_format(spec):
    w = weight(1)
    s, z = scales(w, spec, 0.9)
    out = fake_quantize(w, s, z, spec, lsq_grad_scale(spec, K))
    (out * torch.randn(N, K, generator=torch.Generator().manual_seed(2))).sum().backward()
    assert torch.isfinite(s.grad).all() and (s.grad != 0).float().mean() > 0.9


def test_lsq_gradients_match_the_paper_int_asymmetric():
    """dW_hat/ds = q - v inside, q where clamped; dW_hat/dw = 1 inside, 0 clamped; dW_hat/dz = -s clamped."""
    spec = QuantSpec("int3", 32, scale_dtype="float32")
    w = weight(3).requires_grad_()
    s0, z0 = fit_scales(w.detach(), spec)
    s, z = (0.6 * s0).requires_grad_(), z0.clone().requires_grad_()  # small steps: some weights clamp
    g = 0.5
    out = fake_quantize(w, s, z, spec, g)
    G = torch.randn(N, K, generator=torch.Generator().manual_seed(4))
    (out * G).sum().backward()
    S, Z = expand_groups(s.detach(), K, 32), expand_groups(z.detach(), K, 32)
    v = w.detach() / S
    u = torch.round(v) + Z
    inside = ((u >= 0) & (u <= 7)).float()
    assert 0.05 < 1 - inside.mean() < 0.9
    q = u.clamp(0, 7) - Z
    assert torch.equal(w.grad, G * inside)
    torch.testing.assert_close(s.grad, g * group_sums(G * (q - inside * v), 32), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z.grad, g * group_sums(-G * (1 - inside) * S, 32), rtol=1e-4, atol=1e-5)


def test_nf_ste_passes_gradient_only_inside_the_codebook_range():
    spec = QuantSpec("nf4", 32, scale_dtype="float32")
    w = weight(5).requires_grad_()
    s, _ = scales(w.detach(), spec, 0.5)  # half the absmax: the largest weights clamp to +-1
    fake_quantize(w, s, None, spec).sum().backward()
    v = w.detach() / expand_groups(s.detach(), K, 32)
    assert torch.equal(w.grad, (v.abs() <= 1).float())
    assert (w.grad == 0).any() and (w.grad == 1).any()


def test_lsq_learns_a_better_step_size():
    """Minimising ||W - fake_quantize(W, s)||^2 over s from a bad start reaches about the RTN error."""
    spec = QuantSpec("int4", 32, symmetric=True, scale_dtype="float32")
    w = weight(6)
    s_rtn, _ = fit_scales(w, spec)
    s = (3 * s_rtn).requires_grad_()
    opt = torch.optim.Adam([s], lr=0.01)

    def err(s):
        return (w - fake_quantize(w, s, None, spec, lsq_grad_scale(spec, K))).pow(2).mean()

    start = err(s).item()
    for _ in range(150):
        opt.zero_grad()
        err(s).backward()
        opt.step()
    final = err(s).item()
    rtn = err(s_rtn).item()
    assert final < 0.3 * start and final < 1.1 * rtn


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_peqa_dequantize_keeps_codes_and_is_linear_in_the_scales(spec):
    q = quantize(weight(7), spec)
    codes = unpack_codes(q)
    s, z = decode_scales(q)
    s = s.clone().requires_grad_()
    w_hat = peqa_dequantize(codes, s, z, spec)
    assert torch.equal(w_hat.detach(), dequantize(q))
    G = torch.randn(N, K, generator=torch.Generator().manual_seed(8))
    (w_hat * G).sum().backward()
    unit = decode(codes, torch.ones_like(s), z, spec)  # value of each code per unit scale
    torch.testing.assert_close(s.grad, group_sums(G * unit, spec.group_size or K), rtol=1e-4, atol=1e-4)


def other_codes(w, s, z, spec):
    """Codes that are not round-to-nearest of w (as GPTQ's are not): those of w plus noise."""
    noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    S = expand_groups(round_scales(s.detach(), spec), w.shape[1], spec.group_size or w.shape[1])
    return encode(w + 0.6 * S * noise, round_scales(s.detach(), spec), z, spec)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_project_to_codes_keeps_the_codes_and_moves_as_little_as_possible(spec):
    w = weight() * 2
    s, z = fit_scales(weight(), spec)
    z = None if z is None else z.detach()
    codes = other_codes(w, s, z, spec)
    p = project_to_codes(w, codes, s, z, spec)
    s_hat = round_scales(s, spec)
    grid = decode(codes, s_hat, z, spec)
    assert torch.equal(encode(p, s_hat, z, spec), codes)
    assert torch.equal(fake_quantize(p, s, z, spec), grid)  # training starts at exactly these codes
    kept = encode(w, s_hat, z, spec) == codes
    assert 0 < kept.float().mean() < 1
    assert torch.equal(p[kept], w[kept])
    assert ((p - w).abs() <= (grid - w).abs()).all()
    assert ((p - w).abs() < (grid - w).abs())[~kept].float().mean() > 0.5  # off the grid point
    bf16 = project_to_codes(w, codes, s, z, spec, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(encode(bf16.float(), s_hat, z, spec), codes)


@pytest.mark.parametrize("inset", [0.0, 0.5])
@pytest.mark.parametrize("spec", [QuantSpec("int3", 32), QuantSpec("int4", None, symmetric=True)])
def test_project_to_codes_clips_into_the_int_rounding_cell(spec, inset):
    """INT: the cell of code c is v = w / s in [c - o - 1/2, c - o + 1/2] (o: the zero point, or 2^(b-1)
    symmetric), open-ended at the first and last code, so the projection is w clipped to it; with an
    inset, clipped points stop that fraction of the way back from the edge toward the grid point."""
    w = weight() * 2
    s, z = fit_scales(weight(), spec)
    codes = other_codes(w, s, z, spec)
    p = project_to_codes(w, codes, s, z, spec, inset=inset)
    gs = spec.group_size or K
    S = expand_groups(round_scales(s, spec), K, gs)
    o = expand_groups(z, K, gs) if z is not None else torch.full_like(w, 1 << (spec.bits - 1))
    c = codes.float()
    lo = torch.where(c == 0, -math.inf, c - o - 0.5)
    hi = torch.where(c == (1 << spec.bits) - 1, math.inf, c - o + 0.5)
    clipped = torch.minimum(torch.maximum(w / S, lo), hi) * S
    grid = decode(codes, round_scales(s, spec), z, spec)
    inside = (w / S >= lo) & (w / S <= hi)
    expected = torch.where(inside, w, grid + (1 - inset) * (clipped - grid))
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-4 * S.max().item())
    with pytest.raises(QuantInputError, match="inset"):
        project_to_codes(w, codes, s, z, spec, inset=1.0)


def test_stored_scales_round_like_storage_with_straight_through_gradient():
    spec = QuantSpec("int4", 32, scale_dtype="float16")
    s = torch.tensor([[0.1234567, 0.00123456, 1.0]], requires_grad=True)
    r = stored_scales(s, spec)
    assert torch.equal(r.detach(), s.detach().half().float())
    r.sum().backward()
    assert torch.equal(s.grad, torch.ones_like(s))


def test_negative_learned_scale_stays_finite():
    spec = QuantSpec("int4", 32)
    w = weight(9)
    s, z = scales(w, spec)
    with torch.no_grad():
        s[0, 0] = -1.0
    out = fake_quantize(w, s, z, spec)
    assert torch.isfinite(out).all()
    assert torch.equal(out.detach(), dequantize(requantize(w, s, z, spec)))


def test_bad_inputs_raise_clear_errors():
    spec = QuantSpec("int4", 32)
    w = weight()
    s, z = fit_scales(w, spec)
    with pytest.raises(QuantInputError, match="scales must have shape"):
        fake_quantize(w, s[:, :2], z, spec)
    with pytest.raises(QuantInputError, match="needs zero points"):
        fake_quantize(w, s, None, spec)
    with pytest.raises(QuantInputError, match="has no zero points"):
        fake_quantize(w, s, z, QuantSpec("nf4", 32))
    with pytest.raises(QuantInputError, match="2-D float"):
        requantize(w[0], s, z, spec)
