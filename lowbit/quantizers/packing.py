"""Bit packing of b-bit codes (1 <= b <= 8) into bytes, row by row.

Layout (the checkpoint's `codes` tensor):
- Each row of K codes is packed independently into ceil(K / 8) * b bytes; K is padded with zero codes
  up to a multiple of 8, so a row is a whole number of bytes for every b (3-bit: 8 codes in 3 bytes,
  no wasted bits).
- Codes are taken in groups of 8 consecutive columns. Group i (columns 8i .. 8i + 7) forms one
  8b-bit little-endian word stored in bytes [i * b, (i + 1) * b) of the row: code j of the group
  occupies bits [j * b, (j + 1) * b) of the word, and byte t of the word holds its bits
  [8t, 8t + 8). In other words: lay the codes out as a bit stream, code 0 first, each code
  least-significant bit first, and cut the stream into bytes, first bit = least significant.
- Examples: 4-bit, codes (c0, c1, ...) -> bytes (c0 | c1 << 4, c2 | c3 << 4, ...); 2-bit -> byte 0 is
  c0 | c1 << 2 | c2 << 4 | c3 << 6; 8-bit -> the codes themselves; 3-bit -> byte 0 = c0 | c1 << 3 |
  (c2 & 3) << 6, byte 1 = c2 >> 2 | c3 << 1 | c4 << 4 | (c5 & 1) << 7, byte 2 = c5 >> 1 | c6 << 2 |
  c7 << 5.
"""

from __future__ import annotations

import torch

from lowbit.quantizers.spec import QuantInputError


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes per packed row of K = in_features codes of `bits` bits."""
    return -(-in_features // 8) * bits


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise QuantInputError(f"code width must be 1..8 bits, got {bits!r}")


def _check_uint8_2d(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype != torch.uint8:
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise QuantInputError(f"{name} must be a 2-D uint8 tensor, got {got}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes uint8 [N, K] (each < 2^bits) into uint8 [N, ceil(K / 8) * bits]."""
    _check_bits(bits)
    _check_uint8_2d(codes, "codes")
    n, k = codes.shape
    if codes.numel() and int(codes.max()) >> bits:
        raise QuantInputError(f"codes must be < 2^{bits} = {1 << bits}, got a code of {int(codes.max())}")
    codes = torch.nn.functional.pad(codes, (0, -k % 8))
    if bits == 8:
        return codes.contiguous()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, byte i holds codes [i * per, (i + 1) * per)
        per = 8 // bits
        c = codes.view(n, -1, per)  # [N, K8 / per, per]
        out = c[:, :, 0].clone()
        for j in range(1, per):
            out |= c[:, :, j] << (j * bits)
        return out
    c = codes.view(n, -1, 8).to(torch.int64)  # [N, K8 / 8, 8]
    shifts = torch.arange(8, device=codes.device) * bits
    word = (c << shifts).sum(dim=2, keepdim=True)  # [N, K8 / 8, 1], 8 * bits <= 56 bits: no overflow
    byte_shifts = torch.arange(bits, device=codes.device) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).view(n, -1)  # [N, K8 / 8 * bits]


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 [N, ceil(K / 8) * bits] -> codes uint8 [N, K], K = in_features."""
    _check_bits(bits)
    _check_uint8_2d(packed, "packed codes")
    n, row = packed.shape
    if in_features < 0 or row != packed_row_bytes(in_features, bits):
        raise QuantInputError(
            f"packed rows of {row} bytes do not hold {in_features} {bits}-bit codes "
            f"(expected {packed_row_bytes(in_features, bits)} bytes)"
        )
    if bits == 8:
        return packed[:, :in_features].contiguous()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed[:, :, None] >> shifts) & mask  # [N, row, 8 / bits]
        return codes.view(n, -1)[:, :in_features].contiguous()
    b = packed.contiguous().view(n, -1, bits).to(torch.int64)  # [N, K8 / 8, bits]
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    word = (b << byte_shifts).sum(dim=2, keepdim=True)  # [N, K8 / 8, 1]
    shifts = torch.arange(8, device=packed.device) * bits
    codes = ((word >> shifts) & mask).to(torch.uint8)  # [N, K8 / 8, 8]
    return codes.view(n, -1)[:, :in_features].contiguous()
