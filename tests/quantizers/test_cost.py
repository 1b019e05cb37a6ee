"""Storage cost: the formula equals the bytes of a real QTensor for every format, layout and shape."""

import pytest
import torch

from lowbit.quantizers import FORMATS, QuantSpec, SpecError, bits_per_weight, quantize, storage_bits

SHAPES = [(1, 1), (3, 13), (17, 576), (40, 256), (300, 72)]


def all_specs():
    for fmt, info in FORMATS.items():
        for gs in (8, 64, 128, None):
            for symmetric in (False, True) if info.kind == "int" else (True,):
                yield QuantSpec(fmt, gs, symmetric)
                yield QuantSpec(fmt, gs, symmetric, double_quant=True)
    yield QuantSpec("int4", 128, scale_dtype="float32")
    yield QuantSpec("nf4", 64, scale_dtype="bfloat16")


@pytest.mark.parametrize("shape", SHAPES)
def test_storage_bits_equal_qtensor_bytes(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    for spec in all_specs():
        q = quantize(w, spec)
        assert storage_bits(spec, shape) == 8 * q.nbytes(), spec.short()
        assert bits_per_weight(spec, shape) == 8 * q.nbytes() / w.numel()


def test_known_values():
    # asymmetric: b-bit zero points, packed like codes (GPTQ's qzeros), not a byte each
    assert bits_per_weight(QuantSpec("int4", 128), (4096, 4096)) == 4 + 16 / 128 + 4 / 128
    assert bits_per_weight(QuantSpec("int4", 32, double_quant=True), (4096, 4096)) == (
        4 + 8 / 32 + 4 / 32 + 32 / (32 * 256)
    )
    assert bits_per_weight(QuantSpec("int4", 128, symmetric=True), (4096, 4096)) == 4 + 16 / 128
    assert bits_per_weight(QuantSpec("nf4", 64, double_quant=True), (4096, 4096)) == 4 + 8 / 64 + 32 / (
        64 * 256
    )
    assert bits_per_weight(QuantSpec("fp8_e4m3", None, scale_dtype="float32"), (10, 64)) == 8 + 32 / 64
    # ragged: K = 576, gs = 128 -> 5 groups per row, the short last group counts whole; the 2 * 5 3-bit
    # zero points packed as one row, padded to 16 fields (6 bytes)
    assert storage_bits(QuantSpec("int3", 128), (2, 576)) == 2 * (576 * 3 + 5 * 16) + 16 * 3
    # per channel: N zero points, not a padded row each
    assert storage_bits(QuantSpec("int8", None), (16, 64)) == 16 * (64 * 8 + 16 + 8)
    # double quant: one fp32 max per started block of 256 scales
    assert storage_bits(QuantSpec("int8", 8, symmetric=True, double_quant=True), (1, 8 * 257)) == (
        8 * 257 * 8 + 257 * 8 + 2 * 32
    )
    # K padded to a multiple of 8 per row
    assert storage_bits(QuantSpec("int2", None, symmetric=True), (3, 9)) == 3 * (2 * 2 * 8 + 16)


def test_bad_shape():
    for shape in [(0, 4), (4,), (2, 3, 4), (2.0, 3)]:
        with pytest.raises(SpecError, match="shape"):
            storage_bits(QuantSpec(), shape)
