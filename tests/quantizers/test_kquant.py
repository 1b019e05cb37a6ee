"""llama.cpp's K-quants as lowbit formats (q4_k, q5_k, q6_k): exact cost, the fixed super-block layout, the
ggml fit's properties, the scale packing, and GPTQ encoding each column in place in its super-block."""

import itertools

import pytest
import torch

from lowbit.quantizers import (
    QuantSpec,
    bits_per_weight,
    decode_scales,
    dequantize,
    gptq,
    quantize,
    storage_bits,
)
from lowbit.quantizers.kquant import (
    KTYPES,
    pack_scales_mins,
    qkx2_scale_min,
    qx_scale,
    unpack_scales_mins,
)

KQUANTS = ("q4_k", "q5_k", "q6_k")


def weights(n=32, k=512, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize(("fmt", "bpw"), [("q4_k", 4.5), ("q5_k", 5.5), ("q6_k", 6.5625)])
def test_bits_per_weight_are_llama_cpp_s(fmt, bpw):
    """Codes + fp16 d + the super-block's scale bytes: llama.cpp's blocks of 144, 176 and 210 bytes; a
    ragged last super-block (K = 600: 3 super-blocks) counts as a whole one."""
    assert bits_per_weight(QuantSpec(fmt), (64, 1536)) == bpw
    bits, side = int(fmt[1]), KTYPES[fmt].side_bytes
    assert storage_bits(QuantSpec(fmt), (3, 600)) == 8 * (3 * 75 * bits + 3 * 3 * (2 + side))


def test_the_format_fixes_group_and_scale_storage():
    spec = QuantSpec("q4_k", 32, scale_dtype="bfloat16", double_quant=True)
    assert (spec.group_size, spec.scale_dtype, spec.double_quant, spec.symmetric) == (
        256,
        "float16",
        False,
        True,
    )
    assert spec.short() == "q4_k-g256" and spec.kernel is None
    assert QuantSpec("q6_k", None) == QuantSpec("q6_k", 128)


def test_scale_and_min_bytes_round_trip_every_value():
    """ggml's 12-byte packing of eight 6-bit (scale, min) pairs, against get_scale_min_k4 written out."""
    values = torch.tensor(list(itertools.product(range(64), repeat=2)), dtype=torch.uint8)  # [4096, 2]
    sc = values[:, 0].view(-1, 8)
    m = values[:, 1].view(-1, 8)
    b = pack_scales_mins(sc, m)
    got_sc, got_m = unpack_scales_mins(b)
    assert torch.equal(got_sc, sc.float()) and torch.equal(got_m, m.float())
    q = b[5].tolist()
    for j in range(8):  # ggml-quants.c's get_scale_min_k4
        d, mm = (
            (q[j] & 63, q[j + 4] & 63)
            if j < 4
            else ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
        )
        assert (d, mm) == (int(sc[5, j]), int(m[5, j]))


def test_qkx2_search_beats_the_min_max_grid():
    """make_qkx2_quants keeps a trial only when it lowers the weighted error: never worse than the plain
    (min, max) grid it starts from, and better on most sub-blocks."""
    x = torch.randn(400, 32, generator=torch.Generator().manual_seed(1))
    w = x.square().mean(-1, keepdim=True).sqrt() + x.abs()

    def err(scale, the_min):
        c = torch.round((x + the_min[:, None]) / scale[:, None]).clamp(0, 15)
        return (w * (scale[:, None] * c - the_min[:, None] - x).square()).sum(-1)

    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1)
    plain = err((hi - lo) / 15, -lo)
    scale, the_min = qkx2_scale_min(x, w, 15, KTYPES["q4_k"].sweep)
    searched = err(scale, the_min)
    assert bool((searched <= plain * (1 + 1e-5)).all()) and float((searched < plain).float().mean()) > 0.5


def test_qx_scale_puts_the_largest_weight_at_minus_32():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(2))
    scale = qx_scale(x, 32)
    top = x.gather(1, x.abs().argmax(1, keepdim=True))[:, 0]
    assert bool((torch.sign(scale) == -torch.sign(top)).all())
    assert bool((torch.round(top / scale) >= -33).all() & (torch.round(top / scale) <= -31).all())
    assert torch.equal(qx_scale(torch.zeros(3, 16), 32), torch.zeros(3))


@pytest.mark.parametrize("fmt", KQUANTS)
def test_error_falls_with_bits_and_beats_a_32_block_int4_at_fewer_bits(fmt):
    W = weights()
    rel = float((dequantize(quantize(W, QuantSpec(fmt))) - W).norm() / W.norm())
    # Q4_K (4.5 bits per weight) against Q4_1 (int4 g32 asymmetric, 5 bits per weight)
    q4_1 = float((dequantize(quantize(W, QuantSpec("int4", 32))) - W).norm() / W.norm())
    assert rel < {"q4_k": q4_1, "q5_k": q4_1 / 1.8, "q6_k": q4_1 / 3.5}[fmt], rel


@pytest.mark.parametrize("fmt", KQUANTS)
def test_d_is_positive_and_degenerate_rows_decode_exactly(fmt):
    W = weights(k=600)  # a ragged last super-block of 88 weights
    W[0] = 0.0
    W[1, :256] = -0.01  # one constant (negative) super-block
    W[2, 256:512] = 0.03
    q = quantize(W, QuantSpec(fmt))
    s, z = decode_scales(q)
    assert bool((s > 0).all()) and tuple(z.shape) == (32, 3, KTYPES[fmt].side_bytes)
    W_hat = dequantize(q)
    assert torch.equal(W_hat[0], torch.zeros(600))
    torch.testing.assert_close(W_hat[1, :256], W[1, :256], rtol=0, atol=2e-4)
    torch.testing.assert_close(W_hat[2, 256:512], W[2, 256:512], rtol=0, atol=2e-4)


@pytest.mark.parametrize("fmt", KQUANTS)
def test_gptq_encodes_each_column_in_its_sub_block(fmt):
    """With H = I GPTQ is round-to-nearest (each column coded under its own sub-block's scale, also in a
    ragged last super-block); with a real Hessian it lowers the output error."""
    W = weights(n=8, k=288)
    spec = QuantSpec(fmt)
    nearest = gptq(W, torch.eye(288), spec, damp=0.0, clip=False)
    assert torch.equal(dequantize(nearest), dequantize(quantize(W, spec)))
    X = torch.randn(1024, 288, generator=torch.Generator().manual_seed(3))
    H = X.T @ X

    def output_error(q):
        E = dequantize(q) - W
        return float(((E @ H) * E).sum())

    assert output_error(gptq(W, H, spec)) < 0.95 * output_error(quantize(W, spec))
