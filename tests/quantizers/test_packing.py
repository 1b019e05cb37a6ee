"""Bit packing: exact round trips, the documented byte layout, sizes and input checks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quantizers import QuantInputError, pack, packed_row_bytes, unpack


def reference_pack_row(codes: list[int], bits: int) -> bytes:
    """The layout as a bit stream: code j at bits [j*b, (j+1)*b) of one little-endian integer."""
    k8 = -(-len(codes) // 8) * 8
    stream = sum(c << (j * bits) for j, c in enumerate(codes))
    return stream.to_bytes(k8 * bits // 8, "little")


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 5),
    k=st.integers(1, 70),
    bits=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_and_layout(n, k, bits, seed):
    codes = torch.randint(
        0, 2**bits, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (n, packed_row_bytes(k, bits))
    assert packed.shape[1] == -(-k // 8) * bits
    assert torch.equal(unpack(packed, bits, k), codes)
    assert bytes(packed[0].tolist()) == reference_pack_row(codes[0].tolist(), bits)


def test_documented_examples():
    c = torch.arange(8, dtype=torch.uint8)[None]  # codes 0..7
    assert pack(c, 4).tolist() == [[0x10, 0x32, 0x54, 0x76]]
    assert pack(c & 3, 2).tolist() == [[0b11100100, 0b11100100]]
    b0 = 0 | 1 << 3 | (2 & 3) << 6
    b1 = 2 >> 2 | 3 << 1 | 4 << 4 | (5 & 1) << 7
    b2 = 5 >> 1 | 6 << 2 | 7 << 5
    assert pack(c, 3).tolist() == [[b0, b1, b2]]
    assert torch.equal(pack(c, 8), c)


def test_rows_are_independent_and_padding_is_zero():
    codes = torch.full((2, 5), 7, dtype=torch.uint8)
    packed = pack(codes, 3)  # 5 codes -> one group of 8 -> 3 bytes, the last 3 codes are zero
    assert packed.shape == (2, 3)
    assert torch.equal(packed[0], packed[1])
    assert unpack(packed, 3, 8)[0, 5:].eq(0).all()


def test_large_matrix_round_trip():
    codes = torch.randint(0, 8, (830, 576), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack(pack(codes, 3), 3, 576), codes)


def test_bad_inputs():
    with pytest.raises(QuantInputError, match="< 2\\^4"):
        pack(torch.full((1, 8), 16, dtype=torch.uint8), 4)
    with pytest.raises(QuantInputError, match="uint8"):
        pack(torch.zeros(1, 8, dtype=torch.int32), 4)
    with pytest.raises(QuantInputError, match="2-D"):
        pack(torch.zeros(8, dtype=torch.uint8), 4)
    with pytest.raises(QuantInputError, match="1..8 bits"):
        pack(torch.zeros(1, 8, dtype=torch.uint8), 9)
    with pytest.raises(QuantInputError, match="do not hold"):
        unpack(torch.zeros(1, 4, dtype=torch.uint8), 3, 8)
