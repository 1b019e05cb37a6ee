"""Triton split-K kernel for 4-bit INT / NF weights (M <= MAX_ROWS rows): the quantized linear in one launch.

    y = x_s @ dequantize(Q).T + (x_s @ L2.T) @ L1.T + bias,   x_s = x / smooth

The weight is read in the layout of `lowbit.kernels.layout` (bf16 / fp16 activations). One 1-D grid
holds two kinds of programs:

- T_PROGS prologue programs per row tile (rank > 0 or smoothing), each over one K slice: x_s =
  x * (1 / smooth) written once into a scratch [M, K] (smoothing: never again per weight program),
  t[:, r] += x_s @ L2[:, slice].T added atomically into an fp32 scratch t [M, BLOCK_R] (low rank);
  they then count themselves done. With smoothing the weight programs wait for that count first.
- (M / BLOCK_M) * (N / BLOCK_N) * SPLIT_K weight programs: program (m, n, s) reads rows n of W over
  K range s once for rows m of x. Each K tile is dequantized in registers without conversions
  (`triton_dequant`: inline PTX, 1.5 instructions per weight), multiplied by the activations on the
  tensor cores (W tile [BLOCK_N, KT] as the register operand, x.T [KT, BLOCK_M] as the other; rows of
  x past M are zeros) and accumulated in a [BLOCK_N, BLOCK_M] fp32 tile held in registers for the
  whole K range; the group scales multiply either each group's fp32 partial product or, where that
  costs more (many rows, small groups: SCALE_W), the weights. With SPLIT_K > 1 the partial sums go
  atomically into an fp32 scratch [M, N]; the last program of a tile to arrive (an atomic counter)
  takes the sums back with an atomic exchange (which zeroes the scratch for the next call), waits
  until the prologue programs are done, adds t @ L1[n].T and the bias and writes y in the activation
  dtype. The last tile also zeroes t and the counters.

Waiting inside a launch is safe because the prologue programs have the lowest program ids: the GPU
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
from lowbit.kernels.triton_dequant import columns, dequant_tile, group_rows, scaled

MAX_ROWS = 1024  # the largest M the kernel serves (above: `triton_large`, from a crossover M per format)
MAX_SPLIT_ROWS = 256  # the largest M whose K is split (the fp32 scratch holds this many rows)
MAX_BLOCK_M = 64
# row buckets: one configuration per bucket, chosen at load time
ROW_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)
# loads straight to registers, the fewest instructions per weight (compiled for sm_90, int4-g128: 2.38
# against 2.56 with two stages at 16 rows, 2.60 against 2.77 at 32)
NUM_STAGES = 1
MAX_RANK = 128  # largest low-rank rank the kernel takes (one BLOCK_R tile)
BLOCK_N = ROW_TILE
NUM_WARPS = 4


@triton.jit
def _group_dot(w, x_ptr, scales_ptr, offs_m, offs_n, g, k0, M, K, stride_xm, stride_gn, EVEN_K: tl.constexpr,
               DOT_IEEE: tl.constexpr, WIDTH: tl.constexpr):  # fmt: skip
    """fp32 [BLOCK_N, BLOCK_M]: (w [BLOCK_N, WIDTH] @ x[:, k0 : k0 + WIDTH].T) * s[n, g], one group."""
    x = _load_x(x_ptr, None, offs_m, k0 + tl.arange(0, WIDTH), M, K, stride_xm, False, EVEN_K)
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
def _dot(a, b_t, DOT_IEEE: tl.constexpr, acc=None):
    """acc + a [P, Q] @ b_t.T, fp32; DOT_IEEE: both upcast to fp32 (the interpreter's tl.dot cannot read
    bf16)."""
    if DOT_IEEE:
        return tl.dot(a.to(tl.float32), tl.trans(b_t.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(b_t), acc)


@triton.jit
def _prologue(x_ptr, inv_smooth_ptr, xs_ptr, l2_ptr, t_ptr, lock_ptr, pid, M, K, R, stride_xm, stride_l2r,
              HAS_SMOOTH: tl.constexpr, HAS_LOWRANK: tl.constexpr, DOT_IEEE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, TILE: tl.constexpr, T_PROGS: tl.constexpr,
              T_BLOCK_K: tl.constexpr):  # fmt: skip
    """Over this program's rows and K slice: x_s = x * (1 / smooth) stored once into xs [M, K]
    (HAS_SMOOTH), t [M, R] += x_s @ l2[:, slice].T (HAS_LOWRANK); then count the program done."""
    offs_m = pid // T_PROGS * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    k_begin = pid % T_PROGS * T_BLOCK_K
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_begin, tl.minimum(K, k_begin + T_BLOCK_K), TILE):
        offs_k = k0 + tl.arange(0, TILE)
        x = _load_x(x_ptr, inv_smooth_ptr, offs_m, offs_k, M, K, stride_xm, HAS_SMOOTH, False)
        if HAS_SMOOTH:
            xs_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
            tl.store(xs_ptr + offs_m[:, None] * K + offs_k[None, :], x, mask=xs_mask)
        if HAS_LOWRANK:
            l2_mask = (offs_r[:, None] < R) & (offs_k[None, :] < K)
            l2 = tl.load(l2_ptr + offs_r[:, None] * stride_l2r + offs_k[None, :], mask=l2_mask, other=0.0)
            t = _dot(x, l2, DOT_IEEE, t)
    if HAS_LOWRANK:
        mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
        tl.atomic_add(t_ptr + offs_m[:, None] * BLOCK_R + offs_r[None, :], t, mask=mask, sem="relaxed")
    tl.atomic_add(lock_ptr, 1, sem="release")


@triton.jit
def _epilogue(acc, offs_m, offs_n, t_ptr, l1_ptr, bias_ptr, y_ptr, lock_ptr, M, N, R, stride_l1n, stride_ym,
              pro_progs, HAS_PROLOGUE: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr,
              DOT_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_R: tl.constexpr):  # fmt: skip
    """y[offs_m, offs_n] = acc [BLOCK_N, BLOCK_M] + t @ l1[offs_n].T + bias, cast to y's dtype; the last
    tile resets the prologue's counters (and t)."""
    dtype = y_ptr.dtype.element_ty
    offs_r = tl.arange(0, BLOCK_R)
    if HAS_LOWRANK:
        while tl.atomic_add(lock_ptr, 0, sem="acquire") < pro_progs:  # the prologue programs are done
            pass
        t_mask = (offs_m[None, :] < M) & (offs_r[:, None] < R)
        t_ptrs = t_ptr + offs_m[None, :] * BLOCK_R + offs_r[:, None]  # t.T [BLOCK_R, BLOCK_M]
        t = tl.load(t_ptrs, mask=t_mask, other=0.0, volatile=True)
        l1_mask = (offs_n[:, None] < N) & (offs_r[None, :] < R)
        l1 = tl.load(l1_ptr + offs_n[:, None] * stride_l1n + offs_r[None, :], mask=l1_mask, other=0.0)
        acc += _dot(l1, tl.trans(t.to(dtype)), DOT_IEEE)  # t rounded to x's dtype as the reference does
    if HAS_PROLOGUE:
        tiles = tl.cdiv(N, BLOCK_N) * tl.cdiv(M, BLOCK_M)
        if tl.atomic_add(lock_ptr + 1, 1, sem="acq_rel") == tiles - 1:  # the last tile
            if HAS_LOWRANK:
                for m0 in range(0, M, BLOCK_M):
                    rows = m0 + tl.arange(0, BLOCK_M)
                    mask = (rows[None, :] < M) & (offs_r[:, None] < R)
                    t_zero = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
                    tl.store(t_ptr + rows[None, :] * BLOCK_R + offs_r[:, None], t_zero, mask=mask)
            tl.atomic_xchg(lock_ptr, 0)
            tl.atomic_xchg(lock_ptr + 1, 0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    y_mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(dtype), mask=y_mask)


@triton.jit
def _weight_tile_dot(acc, words_ptr, scales_ptr, offsets_ptr, lut_ptr, x_ptr, offs_m, offs_n, k0, M, K,
                     stride_xm, stride_wn, stride_gn, FMT: tl.constexpr, EVEN_K: tl.constexpr,
                     USE_ASM: tl.constexpr, MAGIC_VALUE: tl.constexpr, GROUP_SIZE: tl.constexpr,
                     SCALE_W: tl.constexpr, DOT_IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
                     TILE: tl.constexpr):  # fmt: skip
    """acc [BLOCK_N, BLOCK_M] + W[offs_n, k0 : k0 + TILE] @ x[offs_m, k0 : k0 + TILE].T, fp32.

    SCALE_W: the scales multiply the weights (in x's dtype, one packed multiply per two weights) and
    one dot accumulates the tile; else each group's fp32 partial product is scaled (one FMA per row,
    column and group: cheaper at few rows)."""
    dtype = x_ptr.dtype.element_ty
    GROUPS: tl.constexpr = TILE // GROUP_SIZE if GROUP_SIZE < TILE else 1
    W: tl.constexpr = TILE // 8
    offs_w = k0 // 8 + tl.arange(0, W)
    # rows of the layout are padded to whole BLOCK_N tiles (stride_gn: padded N): no masks
    words = tl.load(words_ptr + offs_n[:, None] * stride_wn + offs_w[None, :])  # int32 [BN, W]
    g = k0 // GROUP_SIZE
    if FMT == "nf":  # the pair table's address, as a row vector (int64 [BN], see `layout`)
        f0 = tl.load(offsets_ptr.to(tl.pointer_type(tl.int64)) + offs_n)
        f1 = f0
        f2 = f0
        f3 = f0
    else:  # -(MAGIC + z) [BN]
        f0, f1, f2, f3 = group_rows(offsets_ptr, g, stride_gn, offs_n, GROUPS)
    o0, o1, o2, o3, o4, o5, o6, o7 = dequant_tile(
        words, f0, f1, f2, f3, lut_ptr, FMT, USE_ASM, MAGIC_VALUE, dtype, BLOCK_N, TILE
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
        x = _load_x(x_ptr, None, offs_m, offs_k, M, K, stride_xm, False, EVEN_K)
        acc = _dot(columns(parts, BLOCK_N, W, 8), x, DOT_IEEE, acc)
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
    FMT: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr, MAGIC_VALUE: tl.constexpr,
    GROUP_SIZE: tl.constexpr, SCALE_W: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE: tl.constexpr, BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr, T_PROGS: tl.constexpr, T_BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    HAS_PROLOGUE: tl.constexpr = HAS_SMOOTH or HAS_LOWRANK
    pro_progs = T_PROGS * tl.cdiv(M, BLOCK_M)
    if HAS_PROLOGUE:
        if pid < pro_progs:
            _prologue(
                x_ptr, inv_smooth_ptr, xs_ptr, l2_ptr, t_ptr, lock_ptr, pid, M, K, R, stride_xm, stride_l2r,
                HAS_SMOOTH, HAS_LOWRANK, DOT_IEEE, BLOCK_M, BLOCK_R, TILE, T_PROGS, T_BLOCK_K,
            )  # fmt: skip
            return
    else:
        pro_progs = 0
    if HAS_SMOOTH:  # the weight programs read x_s, which the prologue wrote once
        while tl.atomic_add(lock_ptr, 0, sem="acquire") < pro_progs:
            pass
        x_ptr = xs_ptr
        stride_xm = K
    # weight program (m, n, s): rows m of x, rows n of W over K range s
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_k = (pid - pro_progs) % SPLIT_K
    pid_n = (pid - pro_progs) // SPLIT_K % n_tiles
    pid_m = (pid - pro_progs) // SPLIT_K // n_tiles
    tiles_per_split = tl.cdiv(tl.cdiv(K, TILE), SPLIT_K)
    k_begin = pid_k * tiles_per_split * TILE
    k_end = tl.minimum(K, k_begin + tiles_per_split * TILE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y.T tile
    for k0 in range(k_begin, k_end, TILE):
        acc = _weight_tile_dot(
            acc, words_ptr, scales_ptr, offsets_ptr, lut_ptr, x_ptr, offs_m, offs_n, k0, M, K,
            stride_xm, stride_wn, stride_gn, FMT, EVEN_K, USE_ASM, MAGIC_VALUE, GROUP_SIZE, SCALE_W,
            DOT_IEEE, BLOCK_N, TILE,
        )  # fmt: skip
    last = True
    if SPLIT_K > 1:
        ws = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        ws_mask = (offs_m[None, :] < M) & (offs_n < N)[:, None]
        tl.atomic_add(ws, acc, mask=ws_mask, sem="relaxed")
        counter = lock_ptr + 2 + pid_m * n_tiles + pid_n
        last = tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1
        if last:
            # the sums, zeroing the scratch for the next call (exchanged as int32 bit patterns)
            zero = tl.zeros_like(acc).to(tl.int32)
            bits = tl.atomic_xchg(ws.to(tl.pointer_type(tl.int32)), zero, mask=ws_mask)
            acc = bits.to(tl.float32, bitcast=True)
            tl.atomic_xchg(counter, 0)
    if last:
        _epilogue(
            acc, offs_m, offs_n, t_ptr, l1_ptr, bias_ptr, y_ptr, lock_ptr, M, N, R, stride_l1n, stride_ym,
            pro_progs, HAS_PROLOGUE, HAS_LOWRANK, HAS_BIAS, DOT_IEEE, BLOCK_M, BLOCK_N, BLOCK_R,
        )  # fmt: skip


# fp32 split-K sums [MAX_SPLIT_ROWS * N], low-rank t [MAX_ROWS * MAX_RANK] and int32 counters
# [2 + row tiles * N / BLOCK_N] per device, zero between calls (each call leaves them as it found them)
_SCRATCH: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def scratch(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared zeroed scratch tensors of `device`, large enough for N = n (grown, never shrunk)."""
    ws, t, lock = _SCRATCH.get(device, (None, None, None))
    if ws is None or ws.numel() < MAX_SPLIT_ROWS * n:
        ws = torch.zeros(MAX_SPLIT_ROWS * n, dtype=torch.float32, device=device)
        tiles = MAX_SPLIT_ROWS // MAX_BLOCK_M * triton.cdiv(n, BLOCK_N)
        lock = torch.zeros(2 + tiles, dtype=torch.int32, device=device)
        t = torch.zeros(MAX_ROWS * MAX_RANK, dtype=torch.float32, device=device) if t is None else t
        _SCRATCH[device] = (ws, t, lock)
    return ws, t, lock


# smoothed activations x_s [M, K] per (device, dtype), written by the prologue (grown, never shrunk)
_SMOOTHED: dict[tuple, torch.Tensor] = {}


def smoothed_scratch(x: torch.Tensor) -> torch.Tensor:
    """The shared x_s buffer for x [M, K]: at least M * K elements of x's dtype."""
    buf = _SMOOTHED.get((x.device, x.dtype))
    if buf is None or buf.numel() < x.numel():
        buf = _SMOOTHED[(x.device, x.dtype)] = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
    return buf


def multiprocessors(device: torch.device) -> int:
    """SM count of a CUDA device; 4 under the interpreter (so small test layers still split K)."""
    return 4 if device.type == "cpu" else torch.cuda.get_device_properties(device).multi_processor_count


def decode_config(m: int, n: int, k: int, tile: int, group_size: int, rank: int, smooth: bool,
                  sms: int) -> dict:  # fmt: skip
    """Launch constexprs for the row bucket of m rows: BLOCK_M (at most 64; more rows run as row tiles);
    SPLIT_K so that about two programs per SM read the weight (never more K ranges than K tiles, none
    above MAX_SPLIT_ROWS rows); SCALE_W where scaling the weights (0.5 instructions per weight) costs
    less than scaling each group's partial sums (BLOCK_M * groups per tile / TILE); T_PROGS prologue
    programs (low rank or smoothing) of T_BLOCK_K columns each per row tile (at most 16); NUM_STAGES."""
    bucket = row_bucket(m)
    block_m = min(bucket, MAX_BLOCK_M)
    tiles = triton.cdiv(k, tile)
    programs = triton.cdiv(n, BLOCK_N) * triton.cdiv(bucket, block_m)
    split = triton.next_power_of_2(triton.cdiv(2 * sms, programs)) if bucket <= MAX_SPLIT_ROWS else 1
    t_block = tile * triton.cdiv(tiles, 16)
    groups = tile // group_size if group_size < tile else 1
    return dict(
        BLOCK_M=block_m,
        SPLIT_K=max(1, min(split, tiles)),
        SCALE_W=block_m * groups > 64,
        T_PROGS=triton.cdiv(k, t_block) if rank or smooth else 0,
        T_BLOCK_K=t_block,
        BLOCK_R=max(16, triton.next_power_of_2(rank)),
        num_stages=NUM_STAGES,
    )


def row_bucket(m: int) -> int:
    """The row bucket of m rows (1 <= m <= MAX_ROWS): the smallest that holds them."""
    return next(b for b in ROW_BUCKETS if m <= b)


def decode(x: torch.Tensor, dw: DecodeWeight, l1, l2, inv_smooth, bias, config: dict, out=None):
    """y [M, N] = (x * inv_smooth) @ W.T + ((x * inv_smooth) @ l2.T) @ l1.T + bias in one launch.

    x [M, K] (M <= MAX_ROWS, unit stride along K) in the dtype dw was prepared for; l1 [N, r], l2 [r, K], bias
    [N] in that dtype, inv_smooth float32 [K]; config from `decode_config`. Inputs are checked at
    preparation time, not here.
    """
    M, K = x.shape
    N = dw.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    ws, t, lock = scratch(x.device, N)
    xs = None if inv_smooth is None else smoothed_scratch(x)
    R = 0 if l1 is None else l1.shape[1]
    row_tiles = triton.cdiv(M, config["BLOCK_M"])
    grid = (row_tiles * (config["T_PROGS"] + triton.cdiv(N, BLOCK_N) * config["SPLIT_K"]),)
    _decode_kernel[grid](
        x, dw.words, dw.scales, dw.offsets, dw.lut, inv_smooth, l2, l1, bias, y, xs, ws, t, lock,
        M, N, K, R, x.stride(0), dw.words.stride(0), dw.scales.stride(0), 0 if l2 is None else l2.stride(0),
        0 if l1 is None else l1.stride(0), y.stride(0),
        FMT=dw.fmt, EVEN_K=K % dw.tile == 0, USE_ASM=not interpreting(),
        MAGIC_VALUE=MAGIC[x.dtype],
        GROUP_SIZE=dw.group_size, HAS_SMOOTH=inv_smooth is not None, HAS_LOWRANK=R > 0,
        HAS_BIAS=bias is not None, DOT_IEEE=interpreting(), BLOCK_N=BLOCK_N, TILE=dw.tile,
        num_warps=NUM_WARPS, **config,
    )  # fmt: skip
    return y
