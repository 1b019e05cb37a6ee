"""The one-launch decode kernel and the prepared layer against the reference, under Triton's interpreter.

Runs in this process when TRITON_INTERPRET=1 took effect (see test_kernels_triton), else in a fresh one.
The interpreter runs the kernel's plain-Triton dequantization; the inline-PTX one that compiled code
runs is checked by `scripts/kernel_sass.py` and the compile test.
"""

import copy
import dataclasses

import pytest
import torch

from tests.kernels.test_kernels_triton import (
    make_case,
    relative_error,
    run_in_a_fresh_process,
    skip_without_the_interpreter,
)

triton = pytest.importorskip("triton")

from lowbit.kernels import layout, prepared, reference, triton_decode, triton_large, triton_splitk  # noqa: E402
from lowbit.kernels.trace import count_launches  # noqa: E402
from lowbit.quantizers import QuantSpec, dequantize, quantize, unpack_codes  # noqa: E402
from lowbit.quantizers.fp import FP8_DTYPES  # noqa: E402

N, K = 830, 576  # odd N (padded rows), K not a multiple of the 128-column tile
# relative error bound (max abs error / max abs value) against a float64 evaluation of the reference:
# the scale is applied to the fp32 sum of a group, not rounded into every weight (see layout)
TOL = {torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


@pytest.fixture(autouse=True)
def _needs_the_interpreter(request):
    skip_without_the_interpreter(request, {"test_in_a_fresh_process"})


def test_in_a_fresh_process():
    run_in_a_fresh_process(__file__)


def make_layer(spec, rank, smooth, bias, dtype):
    return make_case(spec, rank, smooth, bias, dtype, n=N, k=K)


def run_decode(x, q, l1, l2, smooth, bias):
    """The decode kernel on x [M, K] into an output pre-filled with NaN."""
    dw = layout.prepare_decode(q, x.dtype)
    inv = None if smooth is None else 1.0 / smooth.float()
    rank, smoothed = 0 if l1 is None else l1.shape[1], smooth is not None
    # 16 SMs: two programs per SM split K at every row count here up to 256
    m = x.shape[0]
    config = triton_decode.decode_config(m, N, K, dw.tile, dw.group_size, rank, smoothed, 16, dw.bits)
    out = torch.full((x.shape[0], N), float("nan"), dtype=x.dtype)
    assert triton_decode.decode(x, dw, l1, l2, inv, bias, config, out=out) is out
    return out


@pytest.mark.parametrize("fmt, bits", [("int", 4), ("nf", 4), ("int", 2), ("int", 8)])
def test_packed_words_hold_every_code_where_the_kernel_reads_it(fmt, bits):
    """INT: column slot * W + w in field code_of_slot(bits)[slot] of word w; NF: the two columns of one
    output register (words w, w + 1 of a pair, same slot) in the two nibbles of one byte."""
    q = quantize(torch.randn(N, K), QuantSpec(f"{fmt}{bits}", 64))
    codes = unpack_codes(q)
    for tile in (64, 128, 256):
        width = tile * bits // 32
        words = layout.pack_words(codes, tile, fmt, bits).long() & 0xFFFFFFFF  # [N, Kp * bits / 32]
        col = torch.arange(K)
        w, j = col % width, torch.tensor(layout.code_of_slot(bits))[col % tile // width]
        if fmt == "nf":
            w, j = w - w % 2 + j // 4, 2 * (j % 4) + w % 2
        got = (words[:, col // tile * width + w] >> (bits * j)) & (2**bits - 1)
        assert torch.equal(got, codes.long())


def test_int3_words_rebuild_every_nibble_tile_exactly():
    """The 3-bit layout (3 words per 32 codes) unpacks, by the kernel's bit select, to the 4-bit words
    of its four 128-column tiles: every code read back, bit 3 of a nibble ignored; 3 / 8 bytes a code."""
    q = quantize(torch.randn(N, K), QuantSpec("int3", 64))
    codes = unpack_codes(q)
    words = layout.pack_int3(codes).long() & 0xFFFFFFFF
    Kp = 1024  # K rounded up to 512
    assert words.shape == (N, Kp * 3 // 32)
    a, b, h = (words.view(N, Kp // 512, 3, 16)[:, :, i] for i in range(3))
    sel, rest = layout.INT3_MASK, ~layout.INT3_MASK & 0xFFFFFFFF
    n = torch.stack([a & sel | h & rest, (a >> 2) & sel | (h >> 1) & rest,
                     b & sel | (h << 1) & rest, (b >> 2) & sel | (h << 2) & rest], dim=2)  # fmt: skip
    nibbles = (n.reshape(N, Kp // 8) & 0x77777777)
    padded = torch.nn.functional.pad(codes, (0, Kp - K))
    assert torch.equal(nibbles, layout.pack_words(padded, 128).long() & 0xFFFFFFFF)
    col = torch.arange(K)  # and the 4-bit words hold every code where the 4-bit kernel reads it
    w, j = col % 16, torch.tensor(layout.code_of_slot(4))[col % 128 // 16]
    assert torch.equal((nibbles[:, col // 128 * 16 + w] >> (4 * j)) & 7, codes.long())


def test_decode_tile_takes_groups_that_tile_k():
    tiles = [layout.decode_tile(g, 4096) for g in (None, 32, 64, 128, 256, 4096)]
    assert tiles == [128] * 6
    assert [layout.decode_tile(g, 4096, 2) for g in (None, 64, 128, 512)] == [256] * 4
    assert [layout.decode_tile(g, 4096, 8) for g in (None, 64, 256)] == [128, 64, 128]
    assert [layout.decode_tile(g, 4096, 3) for g in (None, 32, 64, 128, 384)] == [512] * 5
    assert layout.decode_tile(48, 4096, 3) is None
    assert layout.decode_tile(48, 4096) is None and layout.decode_tile(16, 4096) is None
    assert layout.decode_tile(32, 4096, 2) is None and layout.decode_tile(32, 4096, 8) is None
    assert layout.supports(quantize(torch.randn(8, 64), QuantSpec("int3", 32)), torch.bfloat16)
    assert not layout.supports(quantize(torch.randn(8, 64), QuantSpec("nf3", 64)), torch.bfloat16)
    assert layout.supports(quantize(torch.randn(8, 64), QuantSpec("fp4_e2m1", 32)), torch.float16)
    assert layout.supports(quantize(torch.randn(8, 64), QuantSpec("fp8_e4m3", None)), torch.float16)
    assert not layout.supports(quantize(torch.randn(8, 64), QuantSpec("fp8_e5m2", 32)), torch.float16)
    assert not layout.supports(quantize(torch.randn(8, 64), QuantSpec("int4", 32)), torch.float32)
    with pytest.raises(layout.LayoutError, match="int2"):
        layout.prepare_decode(quantize(torch.randn(8, 128), QuantSpec("int2", 32)), torch.bfloat16)


def test_weights_are_scaled_where_that_costs_less():
    """SCALE_W from BLOCK_M * groups per tile > tile / 2 (3-bit: per 128-column part); 2-bit words on
    Hopper only (compiled for sm_80 it costs more)."""
    def scale_w(m, tile, group, bits, hopper=True):
        return triton_decode.decode_config(m, 4096, 4096, tile, group, 0, False, 132, bits, hopper)["SCALE_W"]

    assert [scale_w(m, 128, 64, 4) for m in (16, 32, 64)] == [False, False, True]
    assert [scale_w(m, 512, 64, 3) for m in (16, 32, 64)] == [False, False, True]
    assert [scale_w(m, 256, 64, 2) for m in (16, 32, 64)] == [False, False, True]
    assert not scale_w(64, 256, 64, 2, hopper=False) and scale_w(64, 128, 64, 4, hopper=False)
    assert not scale_w(64, 128, 128, 8)


def case_id(v) -> str:
    return v.short() if isinstance(v, QuantSpec) else str(v).replace("torch.", "")


CASES = [  # (spec, dtype, M, rank, smooth, bias)
    (QuantSpec("int4", 128), torch.bfloat16, 1, 0, False, False),
    (QuantSpec("int4", 128), torch.bfloat16, 5, 64, True, True),
    (QuantSpec("int4", 64, symmetric=True), torch.float16, 32, 8, False, True),
    (QuantSpec("int4", 32, double_quant=True), torch.float16, 1, 4, True, False),
    (QuantSpec("int4", None), torch.bfloat16, 5, 70, False, False),
    (QuantSpec("int4", 256, scale_dtype="bfloat16"), torch.bfloat16, 32, 0, True, True),
    (QuantSpec("nf4", 64), torch.bfloat16, 1, 16, False, True),
    (QuantSpec("nf4", 64, double_quant=True), torch.float16, 5, 0, True, False),
    (QuantSpec("nf4", 128), torch.bfloat16, 32, 0, False, False),
    (QuantSpec("int4", 64), torch.bfloat16, 64, 8, True, True),  # weights scaled (SCALE_W)
    # 3-bit words (tiles of 512 columns, K = 576 padded to 1024); 2-bit words (tiles of 256 columns: 4,
    # 2, 1 groups); 8-bit words
    (QuantSpec("int3", 128), torch.bfloat16, 5, 8, False, True),
    (QuantSpec("int3", 32, symmetric=True), torch.float16, 1, 0, True, False),
    (QuantSpec("int3", None), torch.bfloat16, 32, 70, False, False),
    (QuantSpec("int3", 64), torch.bfloat16, 64, 0, True, True),  # weights scaled (SCALE_W)
    (QuantSpec("int3", 256, double_quant=True), torch.float16, 5, 0, False, False),
    (QuantSpec("int2", 64), torch.bfloat16, 32, 4, True, False),
    (QuantSpec("int2", 128, symmetric=True), torch.float16, 1, 0, False, True),
    (QuantSpec("int2", None), torch.bfloat16, 5, 0, False, False),
    (QuantSpec("int2", 64), torch.bfloat16, 64, 8, False, True),  # weights scaled (SCALE_W)
    (QuantSpec("int2", 64, symmetric=True), torch.float16, 33, 0, True, False),
    (QuantSpec("int8", None), torch.bfloat16, 1, 8, False, True),
    (QuantSpec("int8", 64, symmetric=True), torch.float16, 32, 0, True, False),
    # FP4 E2M1 through the pair table of its codebook, as NF4 (4 groups a tile; SCALE_W at 32 rows)
    (QuantSpec("fp4_e2m1", 32), torch.bfloat16, 1, 8, False, True),
    (QuantSpec("fp4_e2m1", 32), torch.float16, 32, 0, True, False),
    (QuantSpec("fp4_e2m1", 64, scale_dtype="bfloat16"), torch.bfloat16, 5, 0, False, False),
    # FP8 bytes moved into 16-bit floats (E4M3 and E5M2, bf16 and fp16 recipes)
    (QuantSpec("fp8_e4m3", None), torch.bfloat16, 1, 8, False, True),
    (QuantSpec("fp8_e4m3", 64), torch.float16, 32, 0, True, False),
    (QuantSpec("fp8_e5m2", 128, scale_dtype="bfloat16"), torch.bfloat16, 5, 0, False, False),
    (QuantSpec("fp8_e5m2", None, scale_dtype="float32"), torch.float16, 1, 0, False, True),
    (QuantSpec("nf4", 64), torch.bfloat16, 100, 16, True, True),  # two row tiles, split K
    # five row tiles, one K range (as in the 65-row prepared layer below, on 4 SMs)
    pytest.param(QuantSpec("int4", 128), torch.float16, 300, 8, False, True, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("spec, dtype, m, rank, smooth, bias", CASES, ids=case_id)
def test_decode_matches_the_reference(spec, dtype, m, rank, smooth, bias):
    q, *parts = make_layer(spec, rank, smooth, bias, dtype)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert relative_error(run_decode(x, q, *parts), x, q, *parts) <= TOL[dtype]
    ws, t, lock = triton_splitk.scratch(x.device, N)
    assert not ws.any() and not t.any() and not lock.any()  # left as found, for the next call


@pytest.mark.parametrize("fmt", ["int4", "int3", "int2", "int8", "fp4_e2m1", "fp8_e4m3", "fp8_e5m2"])
def test_one_hot_rows_read_back_every_weight_exactly(fmt):
    """Row i of x selects column c_i: y[i] = round(s * (c - z)) (FP: round(s * value(c)), its values
    exact in fp16; not NF's) = dequantize(q, fp16)[:, c_i] bit for bit, subnormal FP8 codes included.

    (fp16: the interpreter rounds fp32 to bf16 toward zero, compiled code to nearest.)
    """
    q = quantize(torch.randn(N, K), QuantSpec(fmt, 64))
    cols = torch.linspace(0, K - 1, 7).round().long()
    x = torch.zeros(7, K, dtype=torch.float16)
    x[torch.arange(7), cols] = 1.0
    assert torch.equal(run_decode(x, q, None, None, None, None), dequantize(q, torch.float16)[:, cols].T)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_every_fp8_code_reads_back_exactly(fmt):
    """Columns 0..255 hold every finite code, subnormals and both zeros: one-hot rows read back
    round(s * value(c)) bit for bit in fp16, within one rounding in bf16 (the interpreter rounds fp32
    to bf16 toward zero, torch to nearest)."""
    q = quantize(torch.randn(N, K), QuantSpec(fmt, None, scale_dtype="float32"))
    codes = torch.arange(256, dtype=torch.uint8)
    finite = codes.view(FP8_DTYPES[fmt]).float().isfinite()
    q = dataclasses.replace(q, codes=q.codes.clone())
    q.codes[:, :256] = torch.where(finite, codes, 0)
    x = torch.eye(256, K)
    got = run_decode(x.half(), q, None, None, None, None)
    assert torch.equal(got, dequantize(q, torch.float16)[:, :256].T)
    got = run_decode(x.bfloat16(), q, None, None, None, None).float()
    want = dequantize(q)[:, :256].T
    assert ((got - want).abs() <= want.abs() * 2**-7).all()


@pytest.mark.parametrize("m", [1, 5, 33, 65])
def test_a_prepared_layer_launches_one_kernel_per_call(m):
    q, *parts = make_layer(QuantSpec("int4", 128), 8, True, True, torch.bfloat16)
    layer = prepared.Prepared(q, *parts)
    x = torch.randn(1, m, K).to(torch.bfloat16)  # any leading dims
    y = layer(x)  # first call: layout, configuration, scratch
    assert relative_error(y.reshape(-1, N), x.reshape(-1, K), q, *parts) <= TOL[torch.bfloat16]
    assert count_launches(lambda: layer(x)) == 1


LARGE_SPECS = [QuantSpec("int3", 128), QuantSpec("nf4", 64, double_quant=True), QuantSpec("fp8_e4m3", None)]


@pytest.mark.parametrize("spec", LARGE_SPECS, ids=case_id)
def test_large_rows_fold_the_weight_and_run_one_matmul(spec, monkeypatch):
    """From a measured crossover (none by default; set here to 33 rows): W' = (dequantize(Q) + L1 L2) /
    smooth in one launch, then one matmul with the bias (two launches), within the tolerance of the
    other paths."""
    q, *parts = make_layer(spec, 8, True, True, torch.bfloat16)
    assert triton_large.crossover(q) is None
    monkeypatch.setitem(triton_large.CROSSOVER_M, spec.format, 33)
    layer = prepared.Prepared(q, *parts)
    x = torch.randn(40, K).to(torch.bfloat16)
    y = layer(x)
    assert relative_error(y, x, q, *parts) <= TOL[torch.bfloat16]
    assert count_launches(lambda: layer(x)) == 2
    assert triton_large.crossover(q) == 33


def test_kernel_cache_forward_takes_every_path():
    q, l1, l2, smooth, bias = make_layer(QuantSpec("nf4", 64), 4, True, True, torch.bfloat16)
    x = torch.randn(65, K).to(torch.bfloat16)  # two row tiles of the decode kernel
    cache = prepared.KernelCache()
    y = prepared.forward(cache, x, q, l1, l2, smooth, bias, backend="triton")
    assert cache.prepared is not None and relative_error(y, x, q, l1, l2, smooth, bias) <= TOL[torch.bfloat16]
    first = cache.prepared
    prepared.forward(cache, x[:3], q, l1, l2, smooth, bias, backend="triton")
    assert cache.prepared is first  # same tensors: kept
    l1b = l1.clone()
    prepared.forward(cache, x[:3], q, l1b, l2, smooth, bias, backend="triton")
    assert cache.prepared is not first  # a replaced tensor: rebuilt
    keep = prepared.KernelCache(keep_dequantized=True)
    want = reference.qlinear(x, q, l1, l2, smooth, bias)
    assert torch.equal(prepared.forward(keep, x, q, l1, l2, smooth, bias), want)
    assert keep.dequantized is not None
    assert torch.equal(prepared.forward(keep, x, q, l1, l2, smooth, bias), want)
    x32 = x.float().requires_grad_(True)  # a gradient is needed: the torch op with its backward
    prepared.forward(prepared.KernelCache(), x32, q, l1, l2, smooth, bias).sum().backward()
    assert x32.grad is not None


def test_keep_dequantized_reaches_every_layer_with_a_kernel_cache():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    for layer in model:
        layer.kernel_cache = prepared.KernelCache()
        layer.kernel_cache.dequantized = ("codes", torch.float32, None)
    assert prepared.keep_dequantized(model) == 2
    assert all(m.kernel_cache.keep_dequantized and m.kernel_cache.dequantized is None for m in model)
    prepared.keep_dequantized(model, keep=False)
    assert not any(m.kernel_cache.keep_dequantized for m in model)
    model[0].kernel_cache.prepared = "built"
    copied = copy.deepcopy(model[0].kernel_cache)
    assert copied.prepared is None and copied.keep_dequantized is False


def test_layout_rows_tile_every_row_block():
    """The kernel loads rows without masks: every BLOCK_N divides the layout's padded row count."""
    blocks = [triton_decode.BLOCK_N] + [b for b, _ in triton_decode.ROW_BLOCKS.values()]
    assert all(layout.ROW_TILE % b == 0 for b in blocks)
