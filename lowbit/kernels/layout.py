"""The decode kernel's weight layout, built once from a checkpoint's QTensor (the checkpoint stays as it is).

The decode kernel (`lowbit.kernels.triton_decode`) reads codes as int32 words of B-bit fields, 32 / B
codes a word: B = 4 for 4-bit INT / NF, B = 2 for 2-bit INT, B = 8 for 8-bit INT; 3-bit INT as three
words per 32 codes (B = 3, below).

- INT, B = 2 and 4: two words become pairs of 16-bit floats with one `prmt` per half word, a shift and
  a `lop3` per field (the magic-number trick: OR a field c into the mantissa of 128.0 in bf16, or of
  1024.0 in fp16, which is exactly 128 + c, resp. 1024 + c) and one packed add per pair that subtracts
  128 + z (exactly c - z).
- INT, B = 8: a byte does not fit bf16's 7-bit mantissa, so each byte goes by one `prmt` into the
  mantissa of the fp32 2^23 (exactly 2^23 + c), one fp32 add subtracts 2^23 + z (exactly c - z), and
  one `cvt.rn.bf16x2.f32` (f16x2) packs a pair: 2.5 instructions per weight, no integer conversion.
- FP8 E4M3 / E5M2 (B = 8, words as 8-bit INT's): each byte moved under the high byte of a 16-bit
  half, exponent and mantissa shifted into the 16-bit float's exponent under the sign, times 2^bias
  (`triton_dequant._fp8_asm`): 2.5 instructions per weight, exact, subnormals included.
- Codebook formats of 16 codes, NF4 and FP4 E2M1 (fmt "nf", B = 4): one load per byte from a
  256-entry table of code pairs (`pair_table` of the format's codebook: every E2M1 value, 0 to 6, is
  exact in bf16 and fp16).

A K tile of KT columns of one row is KT * B / 32 words (W). The kernel dequantizes a word pair (w, w + 1)
into S = 32 / B registers j = 0..S-1, register j holding tensor o_j at elements w and w + 1, and lays
o_j at the tile slot s with code_of_slot(B)[s] = j (the order of its join trees): tile column
c = s * W + word holds o_j[word], j = code_of_slot(B)[c // W]; W >= 16, so that each 16-column block
of the tensor-core operand is one field of 16 words (each thread dequantizes the word pairs it
multiplies, nothing moves through shared memory). INT: o_j[w] is field j of
word w. NF: o_j[2p + i] is nibble 2 (j % 4) + i of word 2p + j // 4, so the two codes of one register
share one byte (`placement`). With B = 4 a tile spans 1, 2 or 4 scale groups (groups of 128 or more,
64, 32): slots 0-3 and 4-7, or slot pairs, so nibble j belongs to group j % 2 (two groups) or
(0, 2, 1, 3)[j % 4] (four); with B = 2 (KT = 256) fields 4q .. 4q + 3 share one group, q * G / 4 of
the tile's G = 1, 2 or 4; with B = 8 a tile lies in one group (KT = 128, or 64 for groups of 64).
Columns past K are padded with code 0 (their activations are 0), rows past N too.

3-bit INT (B = 3, 3 / 8 bytes a weight): a K tile of 512 columns is four 128-column nibble tiles
n_0..n_3 (the 4-bit layout of its columns 128 q .. 128 q + 127, 16 words each, 3-bit codes in the low
three bits of every nibble), stored as 48 words a, b, h (16 each, `pack_int3`): a holds bits 0-1 of
every nibble of n_0 (at bits 4i, 4i + 1) and of n_1 (at 4i + 2, 4i + 3), b those of n_2 and n_3, h bit 2
of every nibble i of n_0, n_1, n_2, n_3 at bits 4i + 2, 4i + 3, 4i + 1, 4i. The kernel rebuilds each
nibble word with one bit select (and at most two shifts), M = 0x33333333:

    n_0 = a & M | h & ~M,  n_1 = (a >> 2) & M | (h >> 1) & ~M,
    n_2 = b & M | (h << 1) & ~M,  n_3 = (b >> 2) & M | (h << 2) & ~M

(bit 3 of every rebuilt nibble is another code's bit, which the 3-bit field mask drops), then
dequantizes it as a 4-bit tile: 9 instructions per 32 weights more than 4 bits, for a quarter fewer
bytes of codes.

Scales are applied once per group, to the fp32 partial sum of the group, not to every weight:

    y[m, n] = sum_g s[n, g] * sum_{k in g} x[m, k] * (c[n, k] - z[n, g])

The reference rounds every s * (c - z) to the activation dtype first; this sum does not, so the two
differ by that rounding (relative 2^-9 per weight in bf16, 2^-12 in fp16, averaging out over K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.quantizers import QTensor, codebook, decode_scales, unpack_codes

# 16-bit magic numbers: a 2- or 4-bit field ORed into their mantissa reads as MAGIC + field
MAGIC = {torch.bfloat16: 128, torch.float16: 1024}
# the fp32 magic number of 8-bit fields (either activation dtype)
MAGIC_FP32 = 2**23
# bits of a code in the layout per stored INT width
LAYOUT_BITS = {2: 2, 3: 3, 4: 4, 8: 8}
# K tile of the layout (and of the kernel's loop)
MAX_TILE = 128
# the bit-select mask of the 3-bit layout (module doc)
INT3_MASK = 0x33333333
# rows of the layout are padded to a multiple of every BLOCK_N of the kernel
ROW_TILE = 256


class LayoutError(ValueError):
    """A quantized weight the decode layout does not take (format, group size, dtype)."""


@dataclass(frozen=True)
class DecodeWeight:
    """A QTensor W [N, K] repacked for the decode kernel, for activations of one 16-bit dtype.

    words int32 [Np, Kp * bits / 32] (Kp = K rounded up to the tile KT, Np = N rounded up to ROW_TILE,
    padding rows and columns hold code 0); scales float32 [Gp, Np] (G groups of K, decoded from double
    quantization, then zero groups up to whole K tiles); offsets: INT [Gp, Np], -(MAGIC + z) in the
    activation dtype (bits 2, 3, 4) or 2^23 + z in float32 (bits 8: `MAGIC_FP32`); NF int64 [Np], the
    address of lut in every row (the kernel's inline PTX reads it as a row vector: a scalar operand
    makes the compiler move the dequantized tile through shared memory); FP8 one unread zero; lut
    int32 [256] (NF: `pair_table` of the codebook) or None; fmt "int", "nf" or the FP8 format
    (`layout_fmt`); bits: of a code in the words (2, 3, 4 or 8); group_size: of the scales (Kp where
    one group spans K, so that every tile of the padded K reads group 0).
    """

    words: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    lut: torch.Tensor | None
    fmt: str
    tile: int
    group_size: int
    shape: tuple[int, int]
    bits: int = 4


def decode_tile(group_size: int | None, k: int, bits: int = 4) -> int | None:
    """KT for a group size (None: per channel) and layout bits, else None: 4 bits, 128 (a tile spans
    1, 2 or 4 groups: 128 or multiples, 64, 32); 3 bits, 512 (four 4-bit tiles, each as a 4-bit one);
    8 bits, 128 (per channel, multiples of 128) or 64 (a tile in one group); 2 bits, 256 (1, 2 or 4
    groups: 256 or multiples, 128, 64). A tile is at least 16 words wide, so that a 16-column block of
    the dot is one field of 16 words (module doc)."""
    tile = {2: 2 * MAX_TILE, 3: 4 * MAX_TILE, 4: MAX_TILE, 8: MAX_TILE}[bits]
    # a 3-bit tile is four 4-bit ones: each must take its groups as a 4-bit tile does
    sub = MAX_TILE if bits == 3 else tile
    if group_size is None or group_size >= k or group_size % sub == 0:
        return tile
    smallest = {2: 64, 3: 32, 4: 32, 8: 64}[bits]
    if sub % group_size or group_size < smallest:
        return None
    return group_size if bits == 8 else tile


def code_of_slot(bits: int) -> tuple[int, ...]:
    """The field of a word that holds the word's slot-th column of a tile, for `bits`-bit fields: the
    bit-reversed slot for 4 and 8 bits (the flattened order of the kernel's balanced join tree), the
    slot itself for 2 bits (the kernel joins those fields in slot order, group by group)."""
    slots = 32 // bits
    width = slots.bit_length() - 1
    if bits == 2:
        return tuple(range(slots))
    return tuple(int(f"{s:0{width}b}"[::-1], 2) for s in range(slots))


# formats whose 4-bit codes the kernel reads through the pair table of their codebook (fmt "nf")
TABLE_FORMATS = ("nf4", "fp4_e2m1")
# FP8 formats: bytes as 8-bit INT's, dequantized by bit moves (fmt: the format's name)
FP8_FORMATS = ("fp8_e4m3", "fp8_e5m2")


def layout_bits(spec) -> int | None:
    """Bits of a code in the layout for a QuantSpec (None: no decode layout)."""
    if spec.format in TABLE_FORMATS:
        return 4
    if spec.format in FP8_FORMATS:
        return 8
    return LAYOUT_BITS.get(spec.bits) if spec.kind == "int" else None


def layout_fmt(spec) -> str:
    """The kernel's FMT of a format the layout takes: "int", "nf" (a codebook through the pair table)
    or the FP8 format's name."""
    if spec.format in FP8_FORMATS:
        return spec.format
    return "int" if spec.kind == "int" else "nf"


def supports(q: QTensor, dtype: torch.dtype) -> bool:
    """Whether `prepare_decode` takes q for activations of `dtype`."""
    spec = q.spec
    bits = layout_bits(spec)
    return bits is not None and dtype in MAGIC and decode_tile(spec.group_size, q.shape[1], bits) is not None


def placement(fmt: str, tile: int, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(word, field) int64 [tile] of every tile column in the kernel's order for `fmt` (module doc)."""
    slots = 32 // bits
    width = tile // slots
    c = torch.arange(tile)
    j, w = torch.tensor(code_of_slot(bits))[c // width], c % width
    if fmt == "nf":
        return w - w % 2 + j // 4, 2 * (j % 4) + w % 2
    return w, j


def pack_words(codes: torch.Tensor, tile: int, fmt: str = "int", bits: int = 4) -> torch.Tensor:
    """int32 [N, Kp * bits / 32] words of uint8 codes [N, K] in the kernel's tile order for `fmt` and
    `bits` a code (module doc)."""
    N, K = codes.shape
    Kp = -(-K // tile) * tile
    c = torch.zeros(N, Kp, dtype=torch.int64, device=codes.device)
    c[:, :K] = codes
    c = c.view(N, Kp // tile, tile)  # [N, tiles, column]
    word, field = (t.to(codes.device) for t in placement(fmt, tile, bits))
    width = tile * bits // 32
    words = torch.zeros(N, Kp // tile, width, dtype=torch.int64, device=codes.device)
    words.index_add_(2, word, c << (bits * field))  # [N, tiles, word], disjoint fields
    # int32 two's complement of the 32-bit pattern
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32).reshape(N, Kp // tile * width)


def pack_int3(codes: torch.Tensor) -> torch.Tensor:
    """int32 [N, Kp * 3 / 32] (Kp = K rounded up to 512) words a, b, h of every 512-column tile of
    3-bit codes [N, K] (module doc): the 4-bit words of its four 128-column tiles, bits redistributed."""
    N, K = codes.shape
    Kp = -(-K // (4 * MAX_TILE)) * 4 * MAX_TILE
    padded = F.pad(codes, (0, Kp - K))
    n = pack_words(padded, MAX_TILE).long().view(N, Kp // (4 * MAX_TILE), 4, MAX_TILE // 8) & 0xFFFFFFFF
    low, high = INT3_MASK, 0x44444444  # bits 0-1 and bit 2 of every nibble
    a = n[:, :, 0] & low | (n[:, :, 1] & low) << 2
    b = n[:, :, 2] & low | (n[:, :, 3] & low) << 2
    h = n[:, :, 0] & high | (n[:, :, 1] & high) << 1 | (n[:, :, 2] & high) >> 1 | (n[:, :, 3] & high) >> 2
    words = torch.stack((a, b, h), dim=2)  # [N, tiles, 3, 16]
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32).reshape(N, Kp * 3 // 32)


def pair_table(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 [256]: entry b holds values[b & 15] (bits 0-15) and values[b >> 4] (bits 16-31) in `dtype`,
    so one load turns a byte of two NF codes into the pair of 16-bit weights."""
    bits = values.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF  # [16]
    b = torch.arange(256)
    table = bits[b & 15] | (bits[b >> 4] << 16)
    return (table - (table >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def prepare_decode(q: QTensor, dtype: torch.dtype) -> DecodeWeight:
    """The decode layout of q for activations of `dtype` (bf16 or fp16); LayoutError if it has none."""
    if not supports(q, dtype):
        taken = "2/3/4/8-bit INT, NF4, FP4 E2M1, FP8 and 16-bit x"
        raise LayoutError(f"the decode kernel takes {taken}, not {q.spec.short()}")
    N, K = q.shape
    spec = q.spec
    bits = layout_bits(spec)
    tile = decode_tile(spec.group_size, K, bits)
    s, z = decode_scales(q)  # float32 [N, G]
    pad = -N % ROW_TILE  # rows padded to whole row tiles: the kernel loads them without masks
    # groups padded to whole K tiles (zero scales): the last tile's groups past K exist
    G = s.shape[1]
    Kp = -(-K // tile) * tile
    g_pad = -(-Kp // spec.group_size) - G if G > 1 else 0
    if spec.kind == "int":
        zero = torch.full_like(s, 2.0 ** (spec.bits - 1)) if z is None else z
        f = (MAGIC_FP32 + zero).T if bits == 8 else -(MAGIC[dtype] + zero).T
        # padding reads as z = 0: finite values (times a zero scale)
        value = float(MAGIC_FP32) if bits == 8 else -float(MAGIC[dtype])
        offsets = F.pad(f, (0, pad, 0, g_pad), value=value).to(torch.float32 if bits == 8 else dtype)
        offsets = offsets.contiguous()
        lut = None
    elif spec.format in FP8_FORMATS:  # no zero point, no table: offsets unread
        offsets = torch.zeros(1, dtype=torch.float32, device=q.codes.device)
        lut = None
    else:
        lut = pair_table(codebook(spec.format), dtype).to(q.codes.device)
        offsets = torch.full((N + pad,), lut.data_ptr(), dtype=torch.int64, device=lut.device)
    codes = unpack_codes(q)
    fmt = layout_fmt(spec)
    words = pack_int3(codes) if bits == 3 else pack_words(codes, tile, fmt, bits)
    return DecodeWeight(
        words=F.pad(words, (0, 0, 0, pad)).contiguous(),
        scales=F.pad(s.T, (0, pad, 0, g_pad)).contiguous(),
        offsets=offsets,
        lut=lut,
        fmt=fmt,
        tile=tile,
        group_size=spec.group_size if G > 1 else Kp,
        shape=(N, K),
        bits=bits,
    )
