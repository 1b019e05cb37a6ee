"""Triton split-K kernel for 2/3/4/8-bit INT, NF4, FP4 and FP8 weights: the quantized linear in one launch.

    y = x_s @ dequantize(Q).T + (x_s @ L2.T) @ L1.T + bias,   x_s = x / smooth

The weight is read in the layout of `lowbit.kernels.layout` (bf16 / fp16 activations). The grid, the
low-rank prologue, the split-K reduction and the epilogue are those of `triton_splitk`. Each weight
program's K tile is dequantized in registers without integer conversions (`triton_dequant`: inline
PTX, 1.5 instructions per weight for 2- and 4-bit words, 2.5 for 8-bit ones; 3-bit words are first
rebuilt into 4-bit ones, about 0.28 more), multiplied by the
activations on the tensor cores (W tile [BLOCK_N, KT] as the register operand, x.T [KT, BLOCK_M] as
the other; rows of x past M are zeros) and accumulated in a [BLOCK_N, BLOCK_M] fp32 tile held in
registers for the whole K range; the group scales multiply either each group's fp32 partial product
or, where that costs more (4-bit words, many rows, small groups: SCALE_W), the weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.layout import INT3_MASK, MAGIC, MAX_TILE, DecodeWeight
from lowbit.kernels.triton_common import interpreting
from lowbit.kernels.triton_dequant import (
    columns,
    dequant_fp8,
    dequant_int2,
    dequant_int8,
    dequant_tile,
    group_rows,
    int3_nibbles,
    scaled,
)
from lowbit.kernels.triton_splitk import (
    dot,
    finish,
    launch_parts,
    load_x,
    prologue,
    row_bucket,
    smoothed_input,
    split_config,
    weight_range,
)

# loads straight to registers, the fewest instructions per weight (compiled for sm_90, int4-g128: 2.38
# against 2.56 with two stages at 16 rows, 2.60 against 2.77 at 32)
NUM_STAGES = 1
# (BLOCK_N, num_warps) per row bucket: 17-32 rows read 256 rows of W with two warpgroups, so the loop's
# fixed part (counter, barriers, scale broadcast) is spread over twice the weights (compiled for sm_90,
# int4-g128 rank 64: 2.45 against 2.51 instructions per weight with 128 rows and 4 warps; 16 rows:
# 2.33 against 2.37, kept at 128 for twice the programs; 64 rows: 255 registers already)
ROW_BLOCKS = {32: (256, 8)}
BLOCK_N = 128
NUM_WARPS = 4
# the 3-bit layout's bit select, for the kernels
INT3_SELECT = tl.constexpr(INT3_MASK)


@triton.jit
def _group_dot(w, x_ptr, scales_ptr, offs_m, offs_n, g, k0, M, K, stride_xm, stride_gn, EVEN_K: tl.constexpr,
               DOT_IEEE: tl.constexpr, WIDTH: tl.constexpr):  # fmt: skip
    """fp32 [BLOCK_N, BLOCK_M]: (w [BLOCK_N, WIDTH] @ x[:, k0 : k0 + WIDTH].T) * s[n, g], one group."""
    x = load_x(x_ptr, None, offs_m, k0 + tl.arange(0, WIDTH), M, K, stride_xm, False, EVEN_K)
    s = tl.load(scales_ptr + g * stride_gn + offs_n)  # fp32 [BN]
    return dot(w, x, DOT_IEEE) * s[:, None]  # the scale once per row and group, on the fp32 partial sum


@triton.jit
def _natural4(a, b, c, d):
    """Join tree of four [BN, W] tensors whose flattened minor axis is a, b, c, d."""
    return tl.join(tl.join(a, c), tl.join(b, d))


@triton.jit
def _natural8(o0, o1, o2, o3, o4, o5, o6, o7):
    return tl.join(_natural4(o0, o2, o4, o6), _natural4(o1, o3, o5, o7))


@triton.jit
def _int2_slots(o, h: tl.constexpr, SLOTS: tl.constexpr):
    """Fields h * SLOTS .. (h + 1) * SLOTS - 1 of sixteen [BN, W] tensors o, joined in that order."""
    b: tl.constexpr = h * SLOTS
    if SLOTS == 4:
        parts = _natural4(o[b], o[b + 1], o[b + 2], o[b + 3])
    elif SLOTS == 8:
        parts = _natural8(o[b], o[b + 1], o[b + 2], o[b + 3], o[b + 4], o[b + 5], o[b + 6], o[b + 7])
    else:
        parts = tl.join(_natural8(o[0], o[2], o[4], o[6], o[8], o[10], o[12], o[14]),
                        _natural8(o[1], o[3], o[5], o[7], o[9], o[11], o[13], o[15]))  # fmt: skip
    return parts


@triton.jit
def _scaled16(o, s0, s1, s2, s3, IN_FP32: tl.constexpr):
    """Sixteen [BN, W] tensors o_j times s_(j // 4) [BN] (`scaled`)."""
    return (
        scaled(o[0], s0, IN_FP32), scaled(o[1], s0, IN_FP32), scaled(o[2], s0, IN_FP32),
        scaled(o[3], s0, IN_FP32), scaled(o[4], s1, IN_FP32), scaled(o[5], s1, IN_FP32),
        scaled(o[6], s1, IN_FP32), scaled(o[7], s1, IN_FP32), scaled(o[8], s2, IN_FP32),
        scaled(o[9], s2, IN_FP32), scaled(o[10], s2, IN_FP32), scaled(o[11], s2, IN_FP32),
        scaled(o[12], s3, IN_FP32), scaled(o[13], s3, IN_FP32), scaled(o[14], s3, IN_FP32),
        scaled(o[15], s3, IN_FP32),
    )  # fmt: skip


@triton.jit
def _wide_tile_dot(acc, words_ptr, scales_ptr, offsets_ptr, x_ptr, offs_m, offs_n, k0, M, K, stride_xm,
                   stride_wn, stride_gn, FMT: tl.constexpr, BITS: tl.constexpr, EVEN_K: tl.constexpr,
                   USE_ASM: tl.constexpr, MAGIC_VALUE: tl.constexpr, GROUP_SIZE: tl.constexpr,
                   SCALE_W: tl.constexpr, DOT_IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
                   TILE: tl.constexpr):  # fmt: skip
    """`_weight_tile_dot` for 2-bit INT and 8-bit INT / FP8 words (see `layout`): 8 bits, a K tile in
    one group, its four bytes in slots o0 o2 o1 o3; 2 bits, a K tile of 1, 2 or 4 groups, field j in
    slot j (SCALE_W: the fields scaled by their group's scale, one dot for the tile)."""
    dtype = x_ptr.dtype.element_ty
    W: tl.constexpr = TILE * BITS // 32
    GROUPS: tl.constexpr = TILE // GROUP_SIZE if GROUP_SIZE < TILE else 1
    offs_w = k0 * BITS // 32 + tl.arange(0, W)
    words = tl.load(words_ptr + offs_n[:, None] * stride_wn + offs_w[None, :])  # int32 [BN, W]
    g = k0 // GROUP_SIZE
    if BITS == 8:
        if FMT == "int":
            f0 = tl.load(offsets_ptr + g * stride_gn + offs_n)  # 2^23 + z [BN]
            o0, o1, o2, o3 = dequant_int8(words, f0, USE_ASM, dtype)
        else:
            o0, o1, o2, o3 = dequant_fp8(words, FMT, USE_ASM, dtype)
        w = columns(tl.join(tl.join(o0, o1), tl.join(o2, o3)), BLOCK_N, W, 4)
        acc += _group_dot(w, x_ptr, scales_ptr, offs_m, offs_n, g, k0, M, K, stride_xm, stride_gn, EVEN_K,
                          DOT_IEEE, TILE)  # fmt: skip
    else:
        tl.static_assert(BITS == 2, "the wide tiles take 2- and 8-bit words")
        # fields j // 4 = 0..3 take the offsets of group g + (j // 4) * GROUPS // 4: v0 v2 v1 v3
        v0, v1, v2, v3 = group_rows(offsets_ptr, g, stride_gn, offs_n, GROUPS)
        o = dequant_int2(words, v0, v2, v1, v3, USE_ASM, MAGIC_VALUE, dtype)
        SLOTS: tl.constexpr = 16 // GROUPS
        if SCALE_W:
            s0, s1, s2, s3 = group_rows(scales_ptr, g, stride_gn, offs_n, GROUPS)
            o = _scaled16(o, s0, s2, s1, s3, DOT_IEEE)  # fields j // 4 = 0..3, as the offsets
            x = load_x(x_ptr, None, offs_m, k0 + tl.arange(0, TILE), M, K, stride_xm, False, EVEN_K)
            acc = dot(columns(_int2_slots(o, 0, 16), BLOCK_N, W, 16), x, DOT_IEEE, acc)
        else:
            for h in tl.static_range(GROUPS):
                w = columns(_int2_slots(o, h, SLOTS), BLOCK_N, W, SLOTS)
                acc += _group_dot(w, x_ptr, scales_ptr, offs_m, offs_n, g + h, k0 + h * (TILE // GROUPS), M,
                                  K, stride_xm, stride_gn, EVEN_K, DOT_IEEE, TILE // GROUPS)  # fmt: skip
    return acc


@triton.jit
def _words(words_ptr, offs_n, stride_wn, first, W: tl.constexpr):
    """int32 [BN, W]: words first .. first + W - 1 of rows offs_n (rows of the layout are padded to
    whole BLOCK_N tiles: no masks)."""
    return tl.load(words_ptr + offs_n[:, None] * stride_wn + (first + tl.arange(0, W))[None, :])


@triton.jit
def _int3_tile_dot(acc, words_ptr, scales_ptr, offsets_ptr, x_ptr, offs_m, offs_n, k0, M, K, stride_xm,
                   stride_wn, stride_gn, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr,
                   MAGIC_VALUE: tl.constexpr, GROUP_SIZE: tl.constexpr, SCALE_W: tl.constexpr,
                   DOT_IEEE: tl.constexpr, BLOCK_N: tl.constexpr, TILE: tl.constexpr):  # fmt: skip
    """`_weight_tile_dot` for a TILE = 512-column tile of 3-bit words a, b, h (`layout`): its four
    128-column nibble tiles rebuilt by `int3_nibbles`, each multiplied as a 4-bit tile."""
    SUB: tl.constexpr = TILE // 4
    W: tl.constexpr = SUB // 8
    first = k0 * 3 // 32  # 48 words a tile
    a = _words(words_ptr, offs_n, stride_wn, first, W)
    b = _words(words_ptr, offs_n, stride_wn, first + W, W)
    h = _words(words_ptr, offs_n, stride_wn, first + 2 * W, W)
    n = int3_nibbles(a, b, h, INT3_SELECT)
    for q in tl.static_range(4):
        acc = _weight_tile_dot(
            acc, n[q], scales_ptr, offsets_ptr, None, x_ptr, offs_m, offs_n, k0 + q * SUB, M, K,
            stride_xm, stride_gn, "int", EVEN_K, USE_ASM, MAGIC_VALUE, GROUP_SIZE, SCALE_W, DOT_IEEE, BLOCK_N,
            SUB, 7,
        )  # fmt: skip
    return acc


@triton.jit
def _weight_tile_dot(acc, words, scales_ptr, offsets_ptr, lut_ptr, x_ptr, offs_m, offs_n, k0, M, K,
                     stride_xm, stride_gn, FMT: tl.constexpr, EVEN_K: tl.constexpr,
                     USE_ASM: tl.constexpr, MAGIC_VALUE: tl.constexpr, GROUP_SIZE: tl.constexpr,
                     SCALE_W: tl.constexpr, DOT_IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
                     TILE: tl.constexpr, MASK: tl.constexpr = 0xF):  # fmt: skip
    """acc [BLOCK_N, BLOCK_M] + W[offs_n, k0 : k0 + TILE] @ x[offs_m, k0 : k0 + TILE].T, fp32, for the
    4-bit words [BLOCK_N, TILE / 8] of the tile (MASK: `dequant_tile`).

    SCALE_W: the scales multiply the weights (in x's dtype, one packed multiply per two weights) and
    one dot accumulates the tile; else each group's fp32 partial product is scaled (one FMA per row,
    column and group: cheaper at few rows)."""
    dtype = x_ptr.dtype.element_ty
    GROUPS: tl.constexpr = TILE // GROUP_SIZE if GROUP_SIZE < TILE else 1
    W: tl.constexpr = TILE // 8
    g = k0 // GROUP_SIZE
    if FMT == "nf":  # the pair table's address, as a row vector (int64 [BN], see `layout`)
        f0 = tl.load(offsets_ptr.to(tl.pointer_type(tl.int64)) + offs_n)
        f1 = f0
        f2 = f0
        f3 = f0
    else:  # -(MAGIC + z) [BN]
        f0, f1, f2, f3 = group_rows(offsets_ptr, g, stride_gn, offs_n, GROUPS)
    o0, o1, o2, o3, o4, o5, o6, o7 = dequant_tile(
        words, f0, f1, f2, f3, lut_ptr, FMT, USE_ASM, MAGIC_VALUE, dtype, BLOCK_N, TILE, MASK
    )
    if SCALE_W:
        s0, s1, s2, s3 = group_rows(scales_ptr, g, stride_gn, offs_n, GROUPS)
        # tl.join adds a minor axis: this tree flattens to o0 o4 o2 o6 o1 o5 o3 o7, slots 0..7
        low = tl.join(tl.join(scaled(o0, s0, DOT_IEEE), scaled(o1, s1, DOT_IEEE)),
                      tl.join(scaled(o2, s2, DOT_IEEE), scaled(o3, s3, DOT_IEEE)))  # fmt: skip
        high = tl.join(tl.join(scaled(o4, s0, DOT_IEEE), scaled(o5, s1, DOT_IEEE)),
                       tl.join(scaled(o6, s2, DOT_IEEE), scaled(o7, s3, DOT_IEEE)))  # fmt: skip
        parts = tl.join(low, high)
        offs_k = k0 + tl.arange(0, TILE)
        x = load_x(x_ptr, None, offs_m, offs_k, M, K, stride_xm, False, EVEN_K)
        acc = dot(columns(parts, BLOCK_N, W, 8), x, DOT_IEEE, acc)
    elif GROUPS == 1:
        low = tl.join(tl.join(o0, o1), tl.join(o2, o3))
        parts = tl.join(low, tl.join(tl.join(o4, o5), tl.join(o6, o7)))
        acc += _group_dot(columns(parts, BLOCK_N, W, 8), x_ptr, scales_ptr, offs_m, offs_n, g,
                          k0, M, K, stride_xm, stride_gn, EVEN_K, DOT_IEEE, TILE)  # fmt: skip
    elif GROUPS == 2:
        for h in tl.static_range(2):
            if h == 0:  # slots 0..3: o0 o4 o2 o6
                parts = tl.join(tl.join(o0, o2), tl.join(o4, o6))
            else:  # slots 4..7: o1 o5 o3 o7
                parts = tl.join(tl.join(o1, o3), tl.join(o5, o7))
            acc += _group_dot(columns(parts, BLOCK_N, W, 4), x_ptr, scales_ptr, offs_m,
                              offs_n, g + h, k0 + h * (TILE // 2), M, K, stride_xm, stride_gn,
                              EVEN_K, DOT_IEEE, TILE // 2)  # fmt: skip
    else:
        for q in tl.static_range(4):
            if q == 0:
                parts = tl.join(o0, o4)
            elif q == 1:
                parts = tl.join(o2, o6)
            elif q == 2:
                parts = tl.join(o1, o5)
            else:
                parts = tl.join(o3, o7)
            acc += _group_dot(columns(parts, BLOCK_N, W, 2), x_ptr, scales_ptr, offs_m,
                              offs_n, g + q, k0 + q * (TILE // 4), M, K, stride_xm, stride_gn,
                              EVEN_K, DOT_IEEE, TILE // 4)  # fmt: skip
    return acc


@triton.jit
def _decode_kernel(
    x_ptr, words_ptr, scales_ptr, offsets_ptr, lut_ptr, inv_smooth_ptr, l2_ptr, l1_ptr, bias_ptr, y_ptr,
    xs_ptr, ws_ptr, t_ptr, lock_ptr,
    M, N, K, R, stride_xm, stride_wn, stride_gn, stride_l2r, stride_l1n, stride_ym,
    FMT: tl.constexpr, BITS: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr,
    MAGIC_VALUE: tl.constexpr, GROUP_SIZE: tl.constexpr, SCALE_W: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE: tl.constexpr, BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr, T_PROGS: tl.constexpr, T_BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    HAS_PROLOGUE: tl.constexpr = HAS_SMOOTH or HAS_LOWRANK
    # the prologue's K step: 512-column (3-bit) tiles of x and L2 would hold too many registers
    PRO_TILE: tl.constexpr = TILE if TILE <= 256 else 256
    pro_progs = prologue(
        x_ptr, inv_smooth_ptr, xs_ptr, l2_ptr, t_ptr, lock_ptr, pid, M, K, R, stride_xm, stride_l2r,
        HAS_SMOOTH, HAS_LOWRANK, DOT_IEEE, BLOCK_M, BLOCK_R, PRO_TILE, T_PROGS, T_BLOCK_K,
    )  # fmt: skip
    if pid < pro_progs:
        return
    x_ptr, stride_xm = smoothed_input(x_ptr, xs_ptr, lock_ptr, stride_xm, K, pro_progs, HAS_SMOOTH)
    offs_m, offs_n, k_begin, k_end, tile = weight_range(pid - pro_progs, M, N, K, BLOCK_M, BLOCK_N, TILE,
                                                        SPLIT_K)  # fmt: skip
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y.T tile
    for k0 in range(k_begin, k_end, TILE):
        if BITS == 4:
            words = _words(words_ptr, offs_n, stride_wn, k0 // 8, TILE // 8)
            acc = _weight_tile_dot(
                acc, words, scales_ptr, offsets_ptr, lut_ptr, x_ptr, offs_m, offs_n, k0, M, K,
                stride_xm, stride_gn, FMT, EVEN_K, USE_ASM, MAGIC_VALUE, GROUP_SIZE, SCALE_W,
                DOT_IEEE, BLOCK_N, TILE,
            )  # fmt: skip
        elif BITS == 3:
            acc = _int3_tile_dot(
                acc, words_ptr, scales_ptr, offsets_ptr, x_ptr, offs_m, offs_n, k0, M, K, stride_xm,
                stride_wn, stride_gn, EVEN_K, USE_ASM, MAGIC_VALUE, GROUP_SIZE, SCALE_W, DOT_IEEE, BLOCK_N,
                TILE,
            )  # fmt: skip
        else:
            acc = _wide_tile_dot(
                acc, words_ptr, scales_ptr, offsets_ptr, x_ptr, offs_m, offs_n, k0, M, K, stride_xm,
                stride_wn, stride_gn, FMT, BITS, EVEN_K, USE_ASM, MAGIC_VALUE, GROUP_SIZE, SCALE_W, DOT_IEEE,
                BLOCK_N, TILE,
            )  # fmt: skip
    finish(
        acc, offs_m, offs_n, tile, ws_ptr, t_ptr, l1_ptr, bias_ptr, y_ptr, lock_ptr, M, N, R, stride_l1n,
        stride_ym, pro_progs, HAS_PROLOGUE, HAS_LOWRANK, HAS_BIAS, DOT_IEEE, BLOCK_M, BLOCK_N, BLOCK_R,
        SPLIT_K,
    )  # fmt: skip


def decode_config(m: int, n: int, k: int, tile: int, group_size: int, rank: int, smooth: bool,
                  sms: int, bits: int = 4, hopper: bool = True) -> dict:  # fmt: skip
    """Launch constexprs for the row bucket of m rows: `triton_splitk.split_config`, SCALE_W (3- and
    4-bit words; 2-bit ones on Hopper only) where scaling the weights (0.5 instructions per weight)
    costs less than scaling each group's partial sums (BLOCK_M * groups per tile / TILE), BLOCK_N and
    num_warps (`ROW_BLOCKS`), NUM_STAGES."""
    block_n, warps = ROW_BLOCKS.get(row_bucket(m), (BLOCK_N, NUM_WARPS))
    config = split_config(m, n, k, tile, block_n, rank, smooth, sms)
    sub = MAX_TILE if bits == 3 else tile  # a 3-bit tile is multiplied as four 4-bit ones
    groups = sub // group_size if group_size < sub else 1
    # scaling each group's partial sums costs BLOCK_M * groups / sub FMAs per weight, the weights 0.5;
    # not for 2-bit words before Hopper (compiled for sm_80, int2-g64 at 64 rows: 7.46 instructions per
    # weight against 4.91 without)
    scale_w = bits in (3, 4) or (bits == 2 and hopper)
    scale_w = scale_w and config["BLOCK_M"] * groups > sub // 2
    return dict(config, SCALE_W=scale_w, BLOCK_N=block_n, num_warps=warps, num_stages=NUM_STAGES)


def decode(x: torch.Tensor, dw: DecodeWeight, l1, l2, inv_smooth, bias, config: dict, out=None):
    """y [M, N] = (x * inv_smooth) @ W.T + ((x * inv_smooth) @ l2.T) @ l1.T + bias in one launch.

    x [M, K] (unit stride along K) in the dtype dw was prepared for; l1 [N, r], l2 [r, K], bias [N] in
    that dtype, inv_smooth float32 [K]; config from `decode_config`. Inputs are checked at
    preparation time, not here.
    """
    M, K = x.shape
    N = dw.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    scratch, R, grid, modes = launch_parts(x, N, config["BLOCK_N"], l1, inv_smooth, bias, config)
    _decode_kernel[grid](
        x, dw.words, dw.scales, dw.offsets, dw.lut, inv_smooth, l2, l1, bias, y, *scratch,
        M, N, K, R, x.stride(0), dw.words.stride(0), dw.scales.stride(0), 0 if l2 is None else l2.stride(0),
        0 if l1 is None else l1.stride(0), y.stride(0),
        FMT=dw.fmt, BITS=dw.bits, EVEN_K=K % dw.tile == 0, USE_ASM=not interpreting(),
        MAGIC_VALUE=MAGIC[x.dtype],
        GROUP_SIZE=dw.group_size, DOT_IEEE=interpreting(), TILE=dw.tile, **modes, **config,
    )  # fmt: skip
    return y
