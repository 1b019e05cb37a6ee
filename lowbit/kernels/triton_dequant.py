"""Dequantization of the decode layout (`lowbit.kernels.layout`) in registers, for the split-K kernel.

A K tile of one row block is int32 words [BLOCK_N, TILE / 8]; it becomes eight [BLOCK_N, TILE / 8]
tensors o_j in the activation dtype (INT: c - z, NF: codebook[c]) that the kernel lays side by side
(`columns`). Compiled code runs inline PTX on pairs of words (Triton's `pack=2`: the two 16-bit
values of one output register are elements w and w + 1 of o_j, the K-adjacent pair a tensor-core
operand register holds):

- INT: `prmt` joins the low (high) halves of the two words, then per nibble a shift and a `lop3`
  ((t & 0x000F000F) | MAGIC: the magic-number trick, exactly MAGIC + c) and one packed fma adding
  -(MAGIC + z): 1.5 instructions per weight.
- NF: the layout puts the two codes of one output register in one byte, so a byte indexes the
  256-entry pair table (`layout.pair_table`, L1-resident) whose entry is that register: `prmt`
  (the byte), `mad.wide` (its address), one load: 1.5 instructions per weight.
- 3-bit INT: each nibble word is first rebuilt from the 3-bit layout's words (`int3_nibbles`, a bit
  select and at most two shifts per word), then as 4-bit INT with the field mask 0x00070007.
- 2-bit INT: as 4-bit INT with sixteen 2-bit fields a word (mask 0x00030003): 1.5 per weight.
- 8-bit INT: per byte j of both words a `prmt` of the byte and the three high bytes of the fp32
  2^23 + z (0x4B0000zz, the offsets operand: 0x4B0000cc = 2^23 + c, no constant to materialise), an fp32
  subtraction of 2^23 + z, one `cvt.rn.bf16x2.f32` (f16x2) for the pair: 2.5 instructions per weight.

- FP8 E4M3 / E5M2: per byte j of both words a `prmt` into the high bytes of the two halves, a shift
  and two `lop3` that move exponent and mantissa into the 16-bit float's low exponent bits under the
  sign (the bit pattern of value * 2^-bias, subnormals included), one packed fma by 2^bias (exact):
  2.5 instructions per weight (`_fp8_asm`).

The interpreter (and `USE_ASM=False`) runs the same arithmetic in plain Triton.
"""

from __future__ import annotations

import triton
import triton.language as tl


def _int_fields_asm(bits: int, operand, code_bits: int | None = None) -> str:
    """32 / bits fields of two words -> as many bf16x2 (fp16x2) pairs (code - (MAGIC + z)): per half
    word and field a shift and a `lop3` keeping the field's low code_bits (default: all), then an fma
    by 1.0 with the offsets operand operand(j) of field j (the K tile may span up to four groups);
    sub.bf16x2 needs sm_90, the fma does not."""
    half = 16 // bits  # fields a half word
    words = 2 * half  # operand number of the first word
    low = 2 ** (code_bits or bits) - 1
    mask = f"0x{low << 16 | low:08X}"
    return (
        f"{{\n.reg .b32 t, u, one;\nmov.b32 one, ONE;\nprmt.b32 t, ${words}, ${words + 1}, 0x5410;\n"
        f"prmt.b32 u, ${words}, ${words + 1}, 0x7632;\n"
        + "".join(
            (f"shr.b32 t, t, {bits};\nshr.b32 u, u, {bits};\n" if j else "")
            + f"lop3.b32 ${j}, t, {mask}, MAGIC, 0xEA;\nlop3.b32 ${j + half}, u, {mask}, MAGIC, 0xEA;\n"
            for j in range(half)
        )
        + "".join(f"fma.rn.OP ${j}, ${j}, one, ${words + 2 + operand(j)};\n" for j in range(2 * half))
        + "}"
    )


# nibble j takes the offsets operand j % 4; 2-bit field j, operand j // 4 (see `layout`)
_INT_ASM = _int_fields_asm(4, lambda j: j % 4)
_INT2_ASM = _int_fields_asm(2, lambda j: j // 4)
_INT3_ASM = _int_fields_asm(4, lambda j: j % 4, 3)

# output register j: the pair-table entry of byte j % 4 of word w (j < 4) or w + 1 (j >= 4)
_NF_ASM = (
    "{\n.reg .b32 i;\n.reg .b64 a;\n"
    + "".join(
        f"prmt.b32 i, ${8 + j // 4}, 0, 0x444{j % 4};\n"
        + f"mad.wide.u32 a, i, 4, $10;\nld.global.nc.b32 ${j}, [a];\n"
        for j in range(8)
    )
    + "}"
)


# four bytes of two words -> four bf16x2 (fp16x2) pairs (code - z): byte j of each word below the high
# bytes of f = 2^23 + z (prmt selector 0x765j: byte j, then f's bytes 1-3 = 0, 0, 0x4B), minus f
_INT8_ASM = (
    "{\n.reg .b32 a, b;\n"
    + "".join(
        f"prmt.b32 a, $4, $6, 0x765{j};\nprmt.b32 b, $5, $6, 0x765{j};\n"
        + f"sub.f32 a, a, $6;\nsub.f32 b, b, $6;\ncvt.rn.OP.f32 ${j}, b, a;\n"
        for j in range(4)
    )
    + "}"
)


# FP8 (E4M3 / E5M2) bytes -> 16-bit floats: the byte under the high byte of a half word, its exponent
# and mantissa shifted down into the 16-bit format's low exponent bits, the sign kept: the same bit
# pattern as the 16-bit float of value * 2^-BIAS (subnormals included), times 2^BIAS exactly.
# (format, dtype) -> (shift, exponent-and-mantissa mask, 2^BIAS as a 16-bit pair)
FP8_BITS = {
    ("fp8_e4m3", "bf16"): (4, 0x07F0, 0x7B80),  # bias 127 - 7 = 120
    ("fp8_e4m3", "f16"): (1, 0x3F80, 0x5C00),  # bias 15 - 7 = 8
    ("fp8_e5m2", "bf16"): (3, 0x0FE0, 0x7780),  # bias 127 - 15 = 112
    ("fp8_e5m2", "f16"): (0, 0x7F00, 0x3C00),  # E5M2 is the high byte of fp16
}


def _fp8_asm(fmt: str, dtype: str) -> tl.constexpr:
    """Four bytes of two words -> four bf16x2 (fp16x2) pairs of FP8 values: per byte j a `prmt` (byte j
    of each word in the high byte of its half), a shift, two `lop3` (exponent and mantissa | sign) and
    one packed fma by 2^BIAS: 2.5 instructions per weight."""
    shift, mask, scale = FP8_BITS[(fmt, dtype)]
    return tl.constexpr(
        "{\n.reg .b32 v, t, s, z;\n"
        + f"mov.b32 s, 0x{scale << 16 | scale:08X};\nmov.b32 z, 0x80008000;\n"
        + "".join(
            f"prmt.b32 v, $4, $5, 0x{4 + j}{4 + j}{j}{j};\nshr.b32 t, v, {shift};\n"
            + f"and.b32 t, t, 0x{mask << 16 | mask:08X};\nlop3.b32 v, v, 0x80008000, t, 0xEA;\n"
            + f"fma.rn.{dtype}x2 ${j}, v, s, z;\n"
            for j in range(4)
        )
        + "}"
    )


FP8_ASM = {key: _fp8_asm(*key) for key in FP8_BITS}
FP8_E4M3_BF16 = FP8_ASM[("fp8_e4m3", "bf16")]
FP8_E4M3_F16 = FP8_ASM[("fp8_e4m3", "f16")]
FP8_E5M2_BF16 = FP8_ASM[("fp8_e5m2", "bf16")]
FP8_E5M2_F16 = FP8_ASM[("fp8_e5m2", "f16")]


def _int_asm(template: str, dtype: str) -> tl.constexpr:
    """The inline PTX of `template` for bf16 or f16 pairs (its constants 1.0, MAGIC and op suffix)."""
    one, magic = {"bf16": ("0x3F803F80", "0x43004300"), "f16": ("0x3C003C00", "0x64006400")}[dtype]
    return tl.constexpr(template.replace("ONE", one).replace("MAGIC", magic).replace("OP", dtype + "x2"))


INT_ASM_BF16 = _int_asm(_INT_ASM, "bf16")
INT_ASM_F16 = _int_asm(_INT_ASM, "f16")
INT3_ASM_BF16 = _int_asm(_INT3_ASM, "bf16")
INT3_ASM_F16 = _int_asm(_INT3_ASM, "f16")
INT2_ASM_BF16 = _int_asm(_INT2_ASM, "bf16")
INT2_ASM_F16 = _int_asm(_INT2_ASM, "f16")
INT8_ASM_BF16 = _int_asm(_INT8_ASM, "bf16")
INT8_ASM_F16 = _int_asm(_INT8_ASM, "f16")
NF_ASM = tl.constexpr(_NF_ASM)


@triton.jit
def _int_nibbles_asm(words, f0, f1, f2, f3, dtype: tl.constexpr, MASK: tl.constexpr):
    """Eight [BN, KT / 8] tensors: nibble j of every word (its low 3 bits where MASK = 7) plus offsets
    f(j % 4) [BN, KT / 8], in `dtype`."""
    cons: tl.constexpr = "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r"
    args = [words, f0, f1, f2, f3]
    if MASK == 7:
        if dtype == tl.bfloat16:
            out = tl.inline_asm_elementwise(INT3_ASM_BF16, cons, args, (tl.bfloat16,) * 8, True, 2)
        else:
            out = tl.inline_asm_elementwise(INT3_ASM_F16, cons, args, (tl.float16,) * 8, True, 2)
    elif dtype == tl.bfloat16:
        out = tl.inline_asm_elementwise(INT_ASM_BF16, cons, args, (tl.bfloat16,) * 8, True, 2)
    else:
        out = tl.inline_asm_elementwise(INT_ASM_F16, cons, args, (tl.float16,) * 8, True, 2)
    return out


@triton.jit
def int3_nibbles(a, b, h, SELECT: tl.constexpr):
    """The four nibble words n_0..n_3 [BN, W] of 3-bit layout words a, b, h [BN, W] (`layout` module
    doc; SELECT = layout.INT3_MASK): bits 0-2 of every nibble are the code, bit 3 is not."""
    n0 = (a & SELECT) | (h & ~SELECT)
    n1 = ((a >> 2) & SELECT) | ((h >> 1) & ~SELECT)
    n2 = (b & SELECT) | ((h << 1) & ~SELECT)
    n3 = ((b >> 2) & SELECT) | ((h << 2) & ~SELECT)
    return n0, n1, n2, n3


@triton.jit
def _nf_asm(words, base, dtype: tl.constexpr):
    """Eight [BN, KT / 8] tensors o_j of NF words (layout `placement`), base: the pair table's address."""
    cons: tl.constexpr = "=r,=r,=r,=r,=r,=r,=r,=r,r,r,l,l"
    if dtype == tl.bfloat16:
        out = tl.inline_asm_elementwise(NF_ASM, cons, [words, base], (tl.bfloat16,) * 8, True, 2)
    else:
        out = tl.inline_asm_elementwise(NF_ASM, cons, [words, base], (tl.float16,) * 8, True, 2)
    return out


@triton.jit
def _int_nibble(words, offsets, SHIFT: tl.constexpr, MAGIC_VALUE: tl.constexpr, dtype: tl.constexpr,
                MASK: tl.constexpr = 0xF):  # fmt: skip
    """(MAGIC + field) + offsets = c - z, exactly, as the inline PTX computes it."""
    c = ((words >> SHIFT) & MASK) + MAGIC_VALUE
    return (c.to(tl.float32) + offsets.to(tl.float32)[:, None]).to(dtype)


@triton.jit
def _int2_field(words, offsets, J: tl.constexpr, MAGIC_VALUE: tl.constexpr, dtype: tl.constexpr):
    return _int_nibble(words, offsets, 2 * J, MAGIC_VALUE, dtype, 3)


@triton.jit
def dequant_int2(words, f0, f1, f2, f3, USE_ASM: tl.constexpr, MAGIC_VALUE: tl.constexpr,
                 dtype: tl.constexpr):  # fmt: skip
    """Sixteen [BN, W] tensors o_j = field j of 2-bit words [BN, W] minus z; f0..f3 [BN] = -(MAGIC + z)
    of the group of fields j with j // 4 = 0..3."""
    if USE_ASM:
        cons: tl.constexpr = "=r," * 16 + "r,r,r,r,r,r"
        shape: tl.constexpr = words.shape
        args = [words, tl.broadcast_to(f0[:, None], shape), tl.broadcast_to(f1[:, None], shape),
                tl.broadcast_to(f2[:, None], shape), tl.broadcast_to(f3[:, None], shape)]  # fmt: skip
        if dtype == tl.bfloat16:
            out = tl.inline_asm_elementwise(INT2_ASM_BF16, cons, args, (tl.bfloat16,) * 16, True, 2)
        else:
            out = tl.inline_asm_elementwise(INT2_ASM_F16, cons, args, (tl.float16,) * 16, True, 2)
    else:
        out = (
            _int2_field(words, f0, 0, MAGIC_VALUE, dtype), _int2_field(words, f0, 1, MAGIC_VALUE, dtype),
            _int2_field(words, f0, 2, MAGIC_VALUE, dtype), _int2_field(words, f0, 3, MAGIC_VALUE, dtype),
            _int2_field(words, f1, 4, MAGIC_VALUE, dtype), _int2_field(words, f1, 5, MAGIC_VALUE, dtype),
            _int2_field(words, f1, 6, MAGIC_VALUE, dtype), _int2_field(words, f1, 7, MAGIC_VALUE, dtype),
            _int2_field(words, f2, 8, MAGIC_VALUE, dtype), _int2_field(words, f2, 9, MAGIC_VALUE, dtype),
            _int2_field(words, f2, 10, MAGIC_VALUE, dtype), _int2_field(words, f2, 11, MAGIC_VALUE, dtype),
            _int2_field(words, f3, 12, MAGIC_VALUE, dtype), _int2_field(words, f3, 13, MAGIC_VALUE, dtype),
            _int2_field(words, f3, 14, MAGIC_VALUE, dtype), _int2_field(words, f3, 15, MAGIC_VALUE, dtype),
        )  # fmt: skip
    return out


@triton.jit
def dequant_int8(words, f0, USE_ASM: tl.constexpr, dtype: tl.constexpr):
    """Four [BN, W] tensors o_j = byte j of words [BN, W] minus z (f0 float32 [BN] = 2^23 + z)."""
    if USE_ASM:
        cons: tl.constexpr = "=r,=r,=r,=r,r,r,r,r"
        f = tl.broadcast_to(f0[:, None], words.shape)
        if dtype == tl.bfloat16:
            out = tl.inline_asm_elementwise(INT8_ASM_BF16, cons, [words, f], (tl.bfloat16,) * 4, True, 2)
        else:
            out = tl.inline_asm_elementwise(INT8_ASM_F16, cons, [words, f], (tl.float16,) * 4, True, 2)
    else:
        f = -f0
        out = (
            _int_nibble(words, f, 0, 8388608, dtype, 0xFF), _int_nibble(words, f, 8, 8388608, dtype, 0xFF),
            _int_nibble(words, f, 16, 8388608, dtype, 0xFF), _int_nibble(words, f, 24, 8388608, dtype, 0xFF),
        )  # fmt: skip
    return out


@triton.jit
def _fp8_byte(words, SHIFT: tl.constexpr, FMT: tl.constexpr, dtype: tl.constexpr):
    """The FP8 value of byte SHIFT / 8 of every word, in `dtype`, by the bit recipe of `_fp8_asm`."""
    v = ((words >> SHIFT) & 0xFF) << 8  # the byte in the high byte of a 16-bit half
    if FMT == "fp8_e4m3" and dtype == tl.bfloat16:
        bits = (v & 0x8000) | ((v >> 4) & 0x07F0)
        factor = 1.329227995784916e36  # 2^120
    elif FMT == "fp8_e4m3":
        bits = (v & 0x8000) | ((v >> 1) & 0x3F80)
        factor = 256.0
    elif dtype == tl.bfloat16:
        bits = (v & 0x8000) | ((v >> 3) & 0x0FE0)
        factor = 5.192296858534828e33  # 2^112
    else:
        bits = v
        factor = 1.0
    if dtype == tl.bfloat16:  # bf16 is the high half of fp32 (numpy keeps its subnormals)
        value = (bits << 16).to(tl.float32, bitcast=True)
    else:
        value = bits.to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
    return (value * factor).to(dtype)  # times 2^bias, exact


@triton.jit
def dequant_fp8(words, FMT: tl.constexpr, USE_ASM: tl.constexpr, dtype: tl.constexpr):
    """Four [BN, W] tensors o_j = the FP8 (FMT: "fp8_e4m3" or "fp8_e5m2") value of byte j of words."""
    if USE_ASM:
        cons: tl.constexpr = "=r,=r,=r,=r,r,r"
        if FMT == "fp8_e4m3":
            if dtype == tl.bfloat16:
                out = tl.inline_asm_elementwise(FP8_E4M3_BF16, cons, [words], (tl.bfloat16,) * 4, True, 2)
            else:
                out = tl.inline_asm_elementwise(FP8_E4M3_F16, cons, [words], (tl.float16,) * 4, True, 2)
        elif dtype == tl.bfloat16:
            out = tl.inline_asm_elementwise(FP8_E5M2_BF16, cons, [words], (tl.bfloat16,) * 4, True, 2)
        else:
            out = tl.inline_asm_elementwise(FP8_E5M2_F16, cons, [words], (tl.float16,) * 4, True, 2)
    else:
        out = (
            _fp8_byte(words, 0, FMT, dtype), _fp8_byte(words, 8, FMT, dtype),
            _fp8_byte(words, 16, FMT, dtype), _fp8_byte(words, 24, FMT, dtype),
        )  # fmt: skip
    return out


@triton.jit
def _nf_pair(lut_ptr, words, SHIFT: tl.constexpr, dtype: tl.constexpr, BLOCK_N: tl.constexpr,
             WORDS: tl.constexpr):  # fmt: skip
    """o [BN, WORDS]: o[:, 2p], o[:, 2p + 1] = both codes of byte SHIFT / 8 of words[:, 2p (+ 1)]."""
    pair = tl.load(lut_ptr + ((words >> SHIFT) & 0xFF))  # int32 [BN, WORDS / 2]
    lo = (pair & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)
    hi = (pair >> 16).to(tl.int16).to(dtype, bitcast=True)
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, WORDS))


@triton.jit
def dequant_tile(words, f0, f1, f2, f3, lut_ptr, FMT: tl.constexpr, USE_ASM: tl.constexpr,
                 MAGIC_VALUE: tl.constexpr, dtype: tl.constexpr, BLOCK_N: tl.constexpr,
                 TILE: tl.constexpr, MASK: tl.constexpr = 0xF):  # fmt: skip
    """Unscaled weights of int32 words [BLOCK_N, TILE / 8], as eight [BLOCK_N, TILE / 8] tensors o_j
    (see the module doc and `layout`): INT c - z, NF codebook[c] in `dtype`. f0..f3 [BLOCK_N] in dtype:
    -(MAGIC + z) of the group of nibbles j with j % 4 = 0..3 (INT); MASK: the code bits of a nibble
    (7: rebuilt 3-bit nibbles, `int3_nibbles`)."""
    W: tl.constexpr = TILE // 8
    if FMT == "nf":
        if USE_ASM:
            base = tl.broadcast_to(f0[:, None], (BLOCK_N, W))
            o0, o1, o2, o3, o4, o5, o6, o7 = _nf_asm(words, base, dtype)
        else:
            even, odd = tl.split(tl.reshape(words, (BLOCK_N, W // 2, 2)))  # [BN, W / 2] each
            o0 = _nf_pair(lut_ptr, even, 0, dtype, BLOCK_N, W)
            o1 = _nf_pair(lut_ptr, even, 8, dtype, BLOCK_N, W)
            o2 = _nf_pair(lut_ptr, even, 16, dtype, BLOCK_N, W)
            o3 = _nf_pair(lut_ptr, even, 24, dtype, BLOCK_N, W)
            o4 = _nf_pair(lut_ptr, odd, 0, dtype, BLOCK_N, W)
            o5 = _nf_pair(lut_ptr, odd, 8, dtype, BLOCK_N, W)
            o6 = _nf_pair(lut_ptr, odd, 16, dtype, BLOCK_N, W)
            o7 = _nf_pair(lut_ptr, odd, 24, dtype, BLOCK_N, W)
    elif USE_ASM:
        shape: tl.constexpr = (BLOCK_N, W)
        o0, o1, o2, o3, o4, o5, o6, o7 = _int_nibbles_asm(
            words, tl.broadcast_to(f0[:, None], shape), tl.broadcast_to(f1[:, None], shape),
            tl.broadcast_to(f2[:, None], shape), tl.broadcast_to(f3[:, None], shape), dtype, MASK,
        )  # fmt: skip
    else:
        o0 = _int_nibble(words, f0, 0, MAGIC_VALUE, dtype, MASK)
        o1 = _int_nibble(words, f1, 4, MAGIC_VALUE, dtype, MASK)
        o2 = _int_nibble(words, f2, 8, MAGIC_VALUE, dtype, MASK)
        o3 = _int_nibble(words, f3, 12, MAGIC_VALUE, dtype, MASK)
        o4 = _int_nibble(words, f0, 16, MAGIC_VALUE, dtype, MASK)
        o5 = _int_nibble(words, f1, 20, MAGIC_VALUE, dtype, MASK)
        o6 = _int_nibble(words, f2, 24, MAGIC_VALUE, dtype, MASK)
        o7 = _int_nibble(words, f3, 28, MAGIC_VALUE, dtype, MASK)
    return o0, o1, o2, o3, o4, o5, o6, o7


@triton.jit
def group_rows(ptr, g, stride_gn, offs_n, GROUPS: tl.constexpr):
    """Per-row values [BN] of the groups of nibbles j with j % 4 = 0..3 in a K tile starting in group g
    (1, 2 or 4 groups a tile: nibble j's group by j % 4, see `layout`)."""
    v0 = tl.load(ptr + g * stride_gn + offs_n)
    v1 = v0
    v2 = v0
    v3 = v0
    if GROUPS == 2:
        v1 = tl.load(ptr + (g + 1) * stride_gn + offs_n)
        v3 = v1
    if GROUPS == 4:
        v2 = tl.load(ptr + (g + 1) * stride_gn + offs_n)
        v1 = tl.load(ptr + (g + 2) * stride_gn + offs_n)
        v3 = tl.load(ptr + (g + 3) * stride_gn + offs_n)
    return v0, v1, v2, v3


@triton.jit
def scaled(o, s, IN_FP32: tl.constexpr):
    """o [BN, W] * s [BN] rounded to x's dtype (the product of s in that dtype and o, rounded once);
    IN_FP32 (the interpreter, whose 16-bit arithmetic is not IEEE): computed in fp32."""
    s = s.to(o.dtype)[:, None]
    if IN_FP32:
        return (o.to(tl.float32) * s.to(tl.float32)).to(o.dtype)
    return o * s


@triton.jit
def columns(parts, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, SLOTS: tl.constexpr):
    """The weight tile [BLOCK_N, SLOTS * WORDS] of a join tree of SLOTS nibble tensors [BLOCK_N, WORDS]
    (flattened join order = slot order): column slot * WORDS + word, as `layout.pack_words` places it."""
    w = tl.reshape(parts, (BLOCK_N, WORDS, SLOTS))
    return tl.reshape(tl.permute(w, (0, 2, 1)), (BLOCK_N, SLOTS * WORDS))
