"""The decode kernel's weight layout, built once from a checkpoint's QTensor (the checkpoint stays as it is).

The decode kernel (`lowbit.kernels.triton_decode`) reads 4-bit codes as int32 words, eight codes a
word. INT: two words become eight pairs of 16-bit floats with one `prmt`, three shifts and four `lop3`
per word (the magic-number trick: OR a nibble c into the mantissa of 128.0 in bf16, or of 1024.0 in
fp16, which is exactly 128 + c, resp. 1024 + c) and one packed add per pair that subtracts 128 + z
(exactly c - z). NF: one load per byte from a 256-entry table of code pairs (`pair_table`).

A K tile of KT = 128 columns of one row is 16 words. The kernel dequantizes a word pair (w, w + 1)
into eight registers j = 0..7, register j holding tensor o_j at elements w and w + 1, and lays o_j at
the tile slot s with NIBBLE_OF_SLOT[s] = j (the order of its joins): tile column c = s * 16 + word
holds o_j[word], j = NIBBLE_OF_SLOT[c // 16]. INT: o_j[w] is nibble j of word w. NF: o_j[2p + i] is
nibble 2 (j % 4) + i of word 2p + j // 4, so the two codes of one register share one byte (`placement`).
A tile spans 1, 2 or 4 scale groups (groups of 128 or more, 64, 32): slots 0-3 and 4-7, or slot
pairs, so nibble j belongs to group j % 2 (two groups) or (0, 2, 1, 3)[j % 4] (four). Columns past K
are padded with code 0 (their activations are 0), rows past N too.

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

# the nibble of a word that holds the word's slot-th column of a tile (bit-reversed: see the kernel)
NIBBLE_OF_SLOT = (0, 4, 2, 6, 1, 5, 3, 7)
# 16-bit magic numbers: a nibble ORed into their mantissa reads as MAGIC + nibble
MAGIC = {torch.bfloat16: 128, torch.float16: 1024}
# K tile of the layout (and of the kernel's loop)
MAX_TILE = 128
# rows of the layout are padded to a multiple of every BLOCK_N of the kernel
ROW_TILE = 256


class LayoutError(ValueError):
    """A quantized weight the decode layout does not take (format, group size, dtype)."""


@dataclass(frozen=True)
class DecodeWeight:
    """A QTensor W [N, K] repacked for the decode kernel, for activations of one 16-bit dtype.

    words int32 [Np, Kp / 8] (Kp = K rounded up to the tile KT, Np = N rounded up to ROW_TILE, padding
    rows and columns hold code 0); scales float32 [Gp, Np] (G groups of K, decoded from double
    quantization, then zero groups up to whole K tiles); offsets: INT [Gp, Np] in the activation dtype,
    -(MAGIC + z); NF int64 [Np], the address of lut in every row (the kernel's inline PTX reads it as a
    row vector: a scalar operand makes the compiler move the dequantized tile through shared memory);
    lut int32 [256] (NF: `pair_table` of the codebook) or None; fmt "int" or "nf".
    """

    words: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    lut: torch.Tensor | None
    fmt: str
    tile: int
    group_size: int
    shape: tuple[int, int]


def decode_tile(group_size: int | None, k: int) -> int | None:
    """KT for a group size (None: per channel): 128 when groups tile it (32, 64, 128 or multiples of
    128; a tile then spans 4, 2 or 1 groups), else None."""
    if group_size is None or group_size >= k or group_size % MAX_TILE == 0:
        return MAX_TILE
    return MAX_TILE if MAX_TILE % group_size == 0 and group_size >= 32 else None


def supports(q: QTensor, dtype: torch.dtype) -> bool:
    """Whether `prepare_decode` takes q for activations of `dtype`."""
    spec = q.spec
    return (
        spec.bits == 4
        and spec.kind in ("int", "nf")
        and dtype in MAGIC
        and decode_tile(spec.group_size, q.shape[1]) is not None
    )


def placement(fmt: str, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(word, nibble) int64 [tile] of every tile column in the kernel's order for `fmt` (module doc)."""
    width = tile // 8
    c = torch.arange(tile)
    j, w = torch.tensor(NIBBLE_OF_SLOT)[c // width], c % width
    if fmt == "nf":
        return w - w % 2 + j // 4, 2 * (j % 4) + w % 2
    return w, j


def pack_words(codes: torch.Tensor, tile: int, fmt: str = "int") -> torch.Tensor:
    """int32 [N, Kp / 8] words of uint8 codes [N, K] in the kernel's tile order for `fmt` (module doc)."""
    N, K = codes.shape
    Kp = -(-K // tile) * tile
    c = torch.zeros(N, Kp, dtype=torch.int64, device=codes.device)
    c[:, :K] = codes
    c = c.view(N, Kp // tile, tile)  # [N, tiles, column]
    word, nibble = (t.to(codes.device) for t in placement(fmt, tile))
    words = torch.zeros(N, Kp // tile, tile // 8, dtype=torch.int64, device=codes.device)
    words.index_add_(2, word, c << (4 * nibble))  # [N, tiles, word], disjoint nibbles
    # int32 two's complement of the 32-bit pattern
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32).reshape(N, Kp // 8)


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
        raise LayoutError(f"the decode kernel takes 4-bit INT / NF and 16-bit x, not {q.spec.short()}")
    N, K = q.shape
    spec = q.spec
    tile = decode_tile(spec.group_size, K)
    s, z = decode_scales(q)  # float32 [N, G]
    pad = -N % ROW_TILE  # rows padded to whole row tiles: the kernel loads them without masks
    # groups padded to whole K tiles (zero scales): the last tile's groups past K exist
    G = s.shape[1]
    g_pad = -(-K // tile) * tile // spec.group_size - G if 1 < G and spec.group_size < tile else 0
    if spec.kind == "int":
        zero = torch.full_like(s, 8.0) if z is None else z
        offsets = F.pad(-(MAGIC[dtype] + zero).T, (0, pad, 0, g_pad)).to(dtype).contiguous()
        lut = None
    else:
        lut = pair_table(codebook(spec.format), dtype).to(q.codes.device)
        offsets = torch.full((N + pad,), lut.data_ptr(), dtype=torch.int64, device=lut.device)
    return DecodeWeight(
        words=F.pad(pack_words(unpack_codes(q), tile, spec.kind), (0, 0, 0, pad)).contiguous(),
        scales=F.pad(s.T, (0, pad, 0, g_pad)).contiguous(),
        offsets=offsets,
        lut=lut,
        fmt=spec.kind,
        tile=tile,
        group_size=spec.group_size if s.shape[1] > 1 else K,
        shape=(N, K),
    )
