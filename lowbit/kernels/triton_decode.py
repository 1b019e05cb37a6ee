"""Triton decode kernel (M <= 64 rows): the whole quantized linear in one launch.

    y = x_s @ dequantize(Q).T + (x_s @ L2.T) @ L1.T + bias,   x_s = x / smooth

The weight is read in the layout of `lowbit.kernels.layout` (4-bit INT / NF, bf16 / fp16 activations).
One 1-D grid holds two kinds of programs:

- T_PROGS low-rank programs (rank > 0 only), each t[:, r] += x_s[:, slice] @ L2[:, slice].T over one
  K slice, added atomically into an fp32 scratch t [M, BLOCK_R]; they then count themselves done.
- (N / BLOCK_N) * SPLIT_K weight programs: program (n, s) reads rows n of W over K range s once.
  Each K tile (one scale group) is dequantized in registers without conversions (the magic-number
  trick, `prmt` / `lop3` / one packed add per two weights in inline PTX, see `layout`), multiplied by
  the activations on the tensor cores (W tile [BLOCK_N, KT] as the register operand, x.T [KT, BLOCK_M]
  as the other; rows of x past M are zeros) into a fresh fp32 tile that is scaled by its group's
  scale once and added to a [BLOCK_N, BLOCK_M] accumulator held in registers for the whole K range.
  With SPLIT_K > 1 the partial sums go atomically into an fp32 scratch [M, N]; the last program of a
  row tile to arrive (an atomic counter) takes the sums back with an atomic exchange (which zeroes
  the scratch for the next call), waits until the low-rank programs are done, adds t @ L1[n].T and the
  bias and writes y in the activation dtype. The last row tile also zeroes t and the counters.

Waiting inside a launch is safe because the low-rank programs have the lowest program ids: the GPU
starts programs in id order, so they are running or done before any weight program waits (the
interpreter runs programs in id order too). Scratch tensors are shared by every layer on a device
(calls on one stream run one after another) and grow only on a first call, outside any CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.layout import MAGIC, ROW_TILE, DecodeWeight
from lowbit.kernels.triton_common import interpreting

MAX_ROWS = 64  # the decode path's largest M
# row buckets (BLOCK_M) and their pipeline stages: one configuration per bucket, chosen at load time
ROW_BUCKETS = {16: 1, 32: 2, 64: 1}
MAX_RANK = 128  # largest low-rank rank the decode path takes (one BLOCK_R tile)
BLOCK_N = ROW_TILE
NUM_WARPS = 4

# eight codes of two words -> eight bf16x2 (fp16x2) pairs (code - (MAGIC + z)): join the low halves of
# the two words (prmt), then per nibble a shift and a lop3 ((t & 0x000F000F) | MAGIC), then one packed
# fma by 1.0 adding -(MAGIC + z) exactly (fma: sub.bf16x2 needs sm_90); nibble j takes the offsets
# operand j % 4 (the K tile may span up to four groups)
_ASM = """{
.reg .b32 t, u, one;
mov.b32 one, ONE;
prmt.b32 t, $8, $9, 0x5410;
prmt.b32 u, $8, $9, 0x7632;
lop3.b32 $0, t, 0x000F000F, MAGIC, 0xEA;
lop3.b32 $4, u, 0x000F000F, MAGIC, 0xEA;
shr.b32 t, t, 4;
shr.b32 u, u, 4;
lop3.b32 $1, t, 0x000F000F, MAGIC, 0xEA;
lop3.b32 $5, u, 0x000F000F, MAGIC, 0xEA;
shr.b32 t, t, 4;
shr.b32 u, u, 4;
lop3.b32 $2, t, 0x000F000F, MAGIC, 0xEA;
lop3.b32 $6, u, 0x000F000F, MAGIC, 0xEA;
shr.b32 t, t, 4;
shr.b32 u, u, 4;
lop3.b32 $3, t, 0x000F000F, MAGIC, 0xEA;
lop3.b32 $7, u, 0x000F000F, MAGIC, 0xEA;
fma.rn.OP $0, $0, one, $10;
fma.rn.OP $1, $1, one, $11;
fma.rn.OP $2, $2, one, $12;
fma.rn.OP $3, $3, one, $13;
fma.rn.OP $4, $4, one, $10;
fma.rn.OP $5, $5, one, $11;
fma.rn.OP $6, $6, one, $12;
fma.rn.OP $7, $7, one, $13;
}"""


def _asm(one: str, magic: str, op: str) -> tl.constexpr:
    return tl.constexpr(_ASM.replace("ONE", one).replace("MAGIC", magic).replace("OP", op))


ASM_BF16 = _asm("0x3F803F80", "0x43004300", "bf16x2")
ASM_F16 = _asm("0x3C003C00", "0x64006400", "f16x2")


@triton.jit
def _nibbles_asm(words, f0, f1, f2, f3, IS_BF16: tl.constexpr):
    """Eight [BN, KT / 8] tensors: nibble j of every word plus offsets f(j % 4) [BN, KT / 8], in x's dtype."""
    cons: tl.constexpr = "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r"
    if IS_BF16:
        out = tl.inline_asm_elementwise(ASM_BF16, cons, [words, f0, f1, f2, f3], (tl.bfloat16,) * 8, True, 2)
    else:
        out = tl.inline_asm_elementwise(ASM_F16, cons, [words, f0, f1, f2, f3], (tl.float16,) * 8, True, 2)
    return out


@triton.jit
def _nibbles_lut(words, lut_ptr, dtype: tl.constexpr):
    """NF: eight [BN, KT / 8] tensors codebook[nibble j of every word], j = 0..7, in x's dtype.

    One load per byte from the 256-entry pair table (`layout.pair_table`, L1-resident): both codes of
    the byte, as the low and high 16 bits of one int32.
    """
    o0, o1 = _pair(lut_ptr, words, 0, dtype)
    o2, o3 = _pair(lut_ptr, words, 8, dtype)
    o4, o5 = _pair(lut_ptr, words, 16, dtype)
    o6, o7 = _pair(lut_ptr, words, 24, dtype)
    return o0, o1, o2, o3, o4, o5, o6, o7


@triton.jit
def _pair(lut_ptr, words, SHIFT: tl.constexpr, dtype: tl.constexpr):
    pair = tl.load(lut_ptr + ((words >> SHIFT) & 0xFF))  # int32 [BN, KT / 8]
    lo = (pair & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)
    return lo, (pair >> 16).to(tl.int16).to(dtype, bitcast=True)


@triton.jit
def _int_nibble(words, offsets, SHIFT: tl.constexpr, MAGIC_VALUE: tl.constexpr, dtype: tl.constexpr):
    """(MAGIC + nibble) + offsets = c - z, exactly, as the inline PTX computes it."""
    c = ((words >> SHIFT) & 0xF) + MAGIC_VALUE
    return (c.to(tl.float32) + offsets.to(tl.float32)[:, None]).to(dtype)


@triton.jit
def dequant_tile(words, f0, f1, f2, f3, lut_ptr, FMT: tl.constexpr, USE_ASM: tl.constexpr,
                 MAGIC_VALUE: tl.constexpr, dtype: tl.constexpr, BLOCK_N: tl.constexpr,
                 TILE: tl.constexpr):  # fmt: skip
    """Unscaled weights of int32 words [BLOCK_N, TILE / 8], as eight [BLOCK_N, TILE / 8] tensors o_j (nibble
    j of every word): INT c - z, NF codebook[c] in `dtype`. f0..f3 [BLOCK_N] in dtype: -(MAGIC + z) of
    the group of nibbles j with j % 4 = 0..3 (INT)."""
    if FMT == "nf":
        o0, o1, o2, o3, o4, o5, o6, o7 = _nibbles_lut(words, lut_ptr, dtype)
    elif USE_ASM:
        shape: tl.constexpr = (BLOCK_N, TILE // 8)
        o0, o1, o2, o3, o4, o5, o6, o7 = _nibbles_asm(
            words, tl.broadcast_to(f0[:, None], shape), tl.broadcast_to(f1[:, None], shape),
            tl.broadcast_to(f2[:, None], shape), tl.broadcast_to(f3[:, None], shape), dtype == tl.bfloat16,
        )  # fmt: skip
    else:
        o0 = _int_nibble(words, f0, 0, MAGIC_VALUE, dtype)
        o1 = _int_nibble(words, f1, 4, MAGIC_VALUE, dtype)
        o2 = _int_nibble(words, f2, 8, MAGIC_VALUE, dtype)
        o3 = _int_nibble(words, f3, 12, MAGIC_VALUE, dtype)
        o4 = _int_nibble(words, f0, 16, MAGIC_VALUE, dtype)
        o5 = _int_nibble(words, f1, 20, MAGIC_VALUE, dtype)
        o6 = _int_nibble(words, f2, 24, MAGIC_VALUE, dtype)
        o7 = _int_nibble(words, f3, 28, MAGIC_VALUE, dtype)
    return o0, o1, o2, o3, o4, o5, o6, o7


@triton.jit
def _columns(parts, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, SLOTS: tl.constexpr):
    """The weight tile [BLOCK_N, SLOTS * WORDS] of a join tree of SLOTS nibble tensors [BLOCK_N, WORDS]
    (flattened join order = slot order): column slot * WORDS + word, as `layout.pack_words` places it."""
    w = tl.reshape(parts, (BLOCK_N, WORDS, SLOTS))
    return tl.reshape(tl.permute(w, (0, 2, 1)), (BLOCK_N, SLOTS * WORDS))


@triton.jit
def _group_dot(w, x_ptr, inv_smooth_ptr, scales_ptr, offs_m, offs_n, g, k0, M, K, stride_xm, stride_gn,
               HAS_SMOOTH: tl.constexpr, EVEN_K: tl.constexpr, DOT_IEEE: tl.constexpr,
               WIDTH: tl.constexpr):  # fmt: skip
    """fp32 [BLOCK_N, BLOCK_M]: (w [BLOCK_N, WIDTH] @ x_s[:, k0 : k0 + WIDTH].T) * s[n, g], one group."""
    x = _load_x(x_ptr, inv_smooth_ptr, offs_m, k0 + tl.arange(0, WIDTH), M, K, stride_xm, HAS_SMOOTH, EVEN_K)
    s = tl.load(scales_ptr + g * stride_gn + offs_n)  # fp32 [BN]
    return _dot(w, x, DOT_IEEE) * s[:, None]  # the scale once per row and group, on the fp32 partial sum


@triton.jit
def _load_x(x_ptr, inv_smooth_ptr, offs_m, offs_k, M, K, stride_xm, HAS_SMOOTH: tl.constexpr,
            EVEN_K: tl.constexpr):  # fmt: skip
    """x_s [BLOCK_M, BLOCK_K] = x * (1 / smooth) rounded to x's dtype, 0 outside x (EVEN_K: K % TILE == 0)."""
    mask = offs_m[:, None] < M
    if not EVEN_K:
        mask = mask & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    if HAS_SMOOTH:
        inv = tl.load(inv_smooth_ptr + offs_k, mask=offs_k < K, other=0.0)
        x = (x.to(tl.float32) * inv[None, :]).to(x_ptr.dtype.element_ty)
    return x


@triton.jit
def _dot(a, b_t, DOT_IEEE: tl.constexpr):
    """a [P, Q] @ b_t.T, fp32; DOT_IEEE: both upcast to fp32 (the interpreter's tl.dot cannot read bf16)."""
    if DOT_IEEE:
        return tl.dot(a.to(tl.float32), tl.trans(b_t.to(tl.float32)), input_precision="ieee")
    return tl.dot(a, tl.trans(b_t))


@triton.jit
def _lowrank_down(x_ptr, inv_smooth_ptr, l2_ptr, t_ptr, lock_ptr, pid, M, K, R, stride_xm, stride_l2r,
                  HAS_SMOOTH: tl.constexpr, DOT_IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_R: tl.constexpr, TILE: tl.constexpr, T_BLOCK_K: tl.constexpr):  # fmt: skip
    """t [M, R] += x_s[:, slice] @ l2[:, slice].T over this program's K slice; then count it done."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid * T_BLOCK_K, tl.minimum(K, (pid + 1) * T_BLOCK_K), TILE):
        offs_k = k0 + tl.arange(0, TILE)
        x = _load_x(x_ptr, inv_smooth_ptr, offs_m, offs_k, M, K, stride_xm, HAS_SMOOTH, False)
        l2_mask = (offs_r[:, None] < R) & (offs_k[None, :] < K)
        l2 = tl.load(l2_ptr + offs_r[:, None] * stride_l2r + offs_k[None, :], mask=l2_mask, other=0.0)
        t += _dot(x, l2, DOT_IEEE)
    mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    tl.atomic_add(t_ptr + offs_m[:, None] * BLOCK_R + offs_r[None, :], t, mask=mask, sem="relaxed")
    tl.atomic_add(lock_ptr, 1, sem="release")


@triton.jit
def _epilogue(acc, offs_m, offs_n, t_ptr, l1_ptr, bias_ptr, y_ptr, lock_ptr, M, N, R, stride_l1n, stride_ym,
              HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr,
              T_PROGS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """y[offs_m, offs_n] = acc [BLOCK_N, BLOCK_M] + t @ l1[offs_n].T + bias, cast to y's dtype."""
    dtype = y_ptr.dtype.element_ty
    if HAS_LOWRANK:
        while tl.atomic_add(lock_ptr, 0, sem="acquire") < T_PROGS:  # the low-rank programs are done
            pass
        offs_r = tl.arange(0, BLOCK_R)
        t_mask = (offs_m[None, :] < M) & (offs_r[:, None] < R)
        t_ptrs = t_ptr + offs_m[None, :] * BLOCK_R + offs_r[:, None]  # t.T [BLOCK_R, BLOCK_M]
        t = tl.load(t_ptrs, mask=t_mask, other=0.0, volatile=True)
        l1_mask = (offs_n[:, None] < N) & (offs_r[None, :] < R)
        l1 = tl.load(l1_ptr + offs_n[:, None] * stride_l1n + offs_r[None, :], mask=l1_mask, other=0.0)
        acc += _dot(l1, tl.trans(t.to(dtype)), DOT_IEEE)  # t rounded to x's dtype as the reference does
        if tl.atomic_add(lock_ptr + 1, 1, sem="acq_rel") == tl.cdiv(N, BLOCK_N) - 1:  # the last tile
            tl.store(t_ptrs, tl.zeros_like(t), mask=t_mask)
            tl.atomic_xchg(lock_ptr, 0)
            tl.atomic_xchg(lock_ptr + 1, 0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    y_mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(dtype), mask=y_mask)


@triton.jit
def _decode_kernel(
    x_ptr, words_ptr, scales_ptr, offsets_ptr, lut_ptr, inv_smooth_ptr, l2_ptr, l1_ptr, bias_ptr, y_ptr,
    ws_ptr, t_ptr, lock_ptr,
    M, N, K, R, stride_xm, stride_wn, stride_gn, stride_l2r, stride_l1n, stride_ym,
    FMT: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr, MAGIC_VALUE: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE: tl.constexpr, BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr, T_PROGS: tl.constexpr, T_BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if HAS_LOWRANK:
        if pid < T_PROGS:
            _lowrank_down(
                x_ptr, inv_smooth_ptr, l2_ptr, t_ptr, lock_ptr, pid, M, K, R, stride_xm, stride_l2r,
                HAS_SMOOTH, DOT_IEEE, BLOCK_M, BLOCK_R, TILE, T_BLOCK_K,
            )  # fmt: skip
            return
    pid_n = (pid - T_PROGS) // SPLIT_K
    pid_k = (pid - T_PROGS) % SPLIT_K
    tiles_per_split = tl.cdiv(tl.cdiv(K, TILE), SPLIT_K)
    k_begin = pid_k * tiles_per_split * TILE
    k_end = tl.minimum(K, k_begin + tiles_per_split * TILE)
    dtype = x_ptr.dtype.element_ty
    GROUPS: tl.constexpr = TILE // GROUP_SIZE if GROUP_SIZE < TILE else 1
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y.T tile
    for k0 in range(k_begin, k_end, TILE):
        offs_w = k0 // 8 + tl.arange(0, TILE // 8)
        # rows of the layout are padded to whole BLOCK_N tiles (stride_gn: padded N): no masks
        words = tl.load(words_ptr + offs_n[:, None] * stride_wn + offs_w[None, :])  # int32 [BN, TILE / 8]
        # groups of this K tile: 1, 2 or 4 (GROUPS); nibble j's group by j % 4 (see `layout`)
        g = k0 // GROUP_SIZE
        f0 = tl.load(offsets_ptr + g * stride_gn + offs_n)  # [BN], -(MAGIC + z)
        f1 = f0
        f2 = f0
        f3 = f0
        if GROUPS == 2:
            f1 = tl.load(offsets_ptr + (g + 1) * stride_gn + offs_n)
            f3 = f1
        if GROUPS == 4:
            f2 = tl.load(offsets_ptr + (g + 1) * stride_gn + offs_n)
            f1 = tl.load(offsets_ptr + (g + 2) * stride_gn + offs_n)
            f3 = tl.load(offsets_ptr + (g + 3) * stride_gn + offs_n)
        o0, o1, o2, o3, o4, o5, o6, o7 = dequant_tile(
            words, f0, f1, f2, f3, lut_ptr, FMT, USE_ASM, MAGIC_VALUE, dtype, BLOCK_N, TILE
        )
        W: tl.constexpr = TILE // 8
        if GROUPS == 1:
            # tl.join adds a minor axis: this tree flattens to o0 o4 o2 o6 o1 o5 o3 o7, slots 0..7
            low = tl.join(tl.join(o0, o1), tl.join(o2, o3))
            parts = tl.join(low, tl.join(tl.join(o4, o5), tl.join(o6, o7)))
            w = _columns(parts, BLOCK_N, W, 8)
            acc += _group_dot(w, x_ptr, inv_smooth_ptr, scales_ptr, offs_m, offs_n, g, k0, M, K, stride_xm,
                              stride_gn, HAS_SMOOTH, EVEN_K, DOT_IEEE, TILE)  # fmt: skip
        elif GROUPS == 2:
            for h in tl.static_range(2):
                if h == 0:  # slots 0..3: o0 o4 o2 o6
                    parts = tl.join(tl.join(o0, o2), tl.join(o4, o6))
                else:  # slots 4..7: o1 o5 o3 o7
                    parts = tl.join(tl.join(o1, o3), tl.join(o5, o7))
                acc += _group_dot(_columns(parts, BLOCK_N, W, 4), x_ptr, inv_smooth_ptr, scales_ptr, offs_m,
                                  offs_n, g + h, k0 + h * (TILE // 2), M, K, stride_xm, stride_gn, HAS_SMOOTH,
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
                acc += _group_dot(_columns(parts, BLOCK_N, W, 2), x_ptr, inv_smooth_ptr, scales_ptr, offs_m,
                                  offs_n, g + q, k0 + q * (TILE // 4), M, K, stride_xm, stride_gn, HAS_SMOOTH,
                                  EVEN_K, DOT_IEEE, TILE // 4)  # fmt: skip
    last = True
    if SPLIT_K > 1:
        ws = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        ws_mask = (offs_m[None, :] < M) & n_mask[:, None]
        tl.atomic_add(ws, acc, mask=ws_mask, sem="relaxed")
        last = tl.atomic_add(lock_ptr + 2 + pid_n, 1, sem="acq_rel") == SPLIT_K - 1
        if last:
            # the sums, zeroing the scratch for the next call (exchanged as int32 bit patterns)
            zero = tl.zeros_like(acc).to(tl.int32)
            bits = tl.atomic_xchg(ws.to(tl.pointer_type(tl.int32)), zero, mask=ws_mask)
            acc = bits.to(tl.float32, bitcast=True)
            tl.atomic_xchg(lock_ptr + 2 + pid_n, 0)
    if last:
        _epilogue(
            acc, offs_m, offs_n, t_ptr, l1_ptr, bias_ptr, y_ptr, lock_ptr, M, N, R, stride_l1n, stride_ym,
            HAS_LOWRANK, HAS_BIAS, DOT_IEEE, T_PROGS, BLOCK_N, BLOCK_R,
        )  # fmt: skip


# fp32 split-K sums [MAX_ROWS * N], low-rank t [MAX_ROWS * MAX_RANK] and int32 counters [2 + N / BLOCK_N]
# per device, zero between calls (each call leaves them as it found them)
_SCRATCH: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def scratch(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared zeroed scratch tensors of `device`, large enough for N = n (grown, never shrunk)."""
    ws, t, lock = _SCRATCH.get(device, (None, None, None))
    if ws is None or ws.numel() < MAX_ROWS * n:
        ws = torch.zeros(MAX_ROWS * n, dtype=torch.float32, device=device)
        lock = torch.zeros(2 + triton.cdiv(n, BLOCK_N), dtype=torch.int32, device=device)
        t = torch.zeros(MAX_ROWS * MAX_RANK, dtype=torch.float32, device=device) if t is None else t
        _SCRATCH[device] = (ws, t, lock)
    return ws, t, lock


def multiprocessors(device: torch.device) -> int:
    """SM count of a CUDA device; 4 under the interpreter (so small test layers still split K)."""
    return 4 if device.type == "cpu" else torch.cuda.get_device_properties(device).multi_processor_count


def decode_config(m: int, n: int, k: int, tile: int, rank: int, sms: int) -> dict:
    """Launch constexprs for M rows: BLOCK_M; SPLIT_K so that about two programs per SM read the weight
    (never more K ranges than K tiles); T_PROGS low-rank programs of T_BLOCK_K columns each (at most 16);
    num_stages from ROW_BUCKETS (1: loads straight to registers, the fewest instructions per weight;
    compiled for sm_90, int4-g128 at 16 rows: 2.38 against 2.56 with two stages)."""
    tiles = triton.cdiv(k, tile)
    split = triton.next_power_of_2(triton.cdiv(2 * sms, triton.cdiv(n, BLOCK_N)))
    split = max(1, min(split, tiles))
    t_block = tile * triton.cdiv(tiles, 16)
    return dict(
        BLOCK_M=row_bucket(m),
        SPLIT_K=split,
        T_PROGS=triton.cdiv(k, t_block) if rank else 0,
        T_BLOCK_K=t_block,
        BLOCK_R=max(16, triton.next_power_of_2(rank)),
        num_stages=ROW_BUCKETS[row_bucket(m)],
    )


def row_bucket(m: int) -> int:
    """BLOCK_M for m rows (1 <= m <= MAX_ROWS): the smallest bucket that holds them."""
    return next(b for b in ROW_BUCKETS if m <= b)


def decode(
    x: torch.Tensor,
    dw: DecodeWeight,
    l1: torch.Tensor | None,
    l2: torch.Tensor | None,
    inv_smooth: torch.Tensor | None,
    bias: torch.Tensor | None,
    config: dict,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [M, N] = (x * inv_smooth) @ W.T + ((x * inv_smooth) @ l2.T) @ l1.T + bias in one launch.

    x [M, K] (M <= 64, unit stride along K) in the dtype dw was prepared for; l1 [N, r], l2 [r, K], bias
    [N] in that dtype, inv_smooth float32 [K]; config from `decode_config`. Inputs are checked at
    preparation time, not here.
    """
    M, K = x.shape
    N = dw.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    ws, t, lock = scratch(x.device, N)
    R = 0 if l1 is None else l1.shape[1]
    grid = (config["T_PROGS"] + triton.cdiv(N, BLOCK_N) * config["SPLIT_K"],)
    _decode_kernel[grid](
        x, dw.words, dw.scales, dw.offsets, dw.lut, inv_smooth, l2, l1, bias, y, ws, t, lock,
        M, N, K, R, x.stride(0), dw.words.stride(0), dw.scales.stride(0), 0 if l2 is None else l2.stride(0),
        0 if l1 is None else l1.stride(0), y.stride(0),
        FMT=dw.fmt, EVEN_K=K % dw.tile == 0, USE_ASM=not interpreting(),
        MAGIC_VALUE=MAGIC[x.dtype],
        GROUP_SIZE=dw.group_size, HAS_SMOOTH=inv_smooth is not None, HAS_LOWRANK=R > 0,
        HAS_BIAS=bias is not None, DOT_IEEE=interpreting(), BLOCK_N=BLOCK_N, TILE=dw.tile,
        num_warps=NUM_WARPS, **config,
    )  # fmt: skip
    return y
