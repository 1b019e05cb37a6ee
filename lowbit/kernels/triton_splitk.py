"""What the one-launch split-K kernels share: low-rank prologue, split-K reduction, epilogue, scratch.

Both one-launch kernels (`triton_decode`: 4-bit INT / NF in their decode layout; `triton_fused`: every
other stored format, read as the checkpoint stores it) compute

    y = x_s @ dequantize(Q).T + (x_s @ L2.T) @ L1.T + bias,   x_s = x / smooth

in one launch. Their 1-D grid holds two kinds of programs:

- T_PROGS prologue programs per row tile (rank > 0 or smoothing), each over one K slice (`prologue`):
  x_s = x * (1 / smooth) written once into a scratch [M, K] (smoothing: never again per weight
  program), t[:, r] += x_s @ L2[:, slice].T added atomically into an fp32 scratch t [M, BLOCK_R] (low
  rank); they then count themselves done. With smoothing the weight programs wait for that count
  first (`smoothed_input`).
- (M / BLOCK_M) * (N / BLOCK_N) * SPLIT_K weight programs (`weight_range`): program (m, n, s) reads
  rows n of W over K range s once for rows m of x and accumulates a y.T tile [BLOCK_N, BLOCK_M] in
  fp32 registers. With SPLIT_K > 1 the partial sums go atomically into an fp32 scratch [M, N]; the
  last program of a tile to arrive (an atomic counter) takes the sums back with an atomic exchange
  (which zeroes the scratch for the next call) and runs the epilogue (`finish`): it waits until the
  prologue programs are done, adds t @ L1[n].T and the bias and writes y in the activation dtype. The
  last tile also zeroes t and the counters.

Waiting inside a launch is safe because the prologue programs have the lowest program ids: the GPU
starts programs in id order, so they are running or done before any weight program waits (the
interpreter runs programs in id order too). Scratch tensors are shared by every layer on a device
(calls on one stream run one after another) and grow only on a first call, outside any CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_SPLIT_ROWS = 256  # the largest M whose K is split (the fp32 scratch holds this many rows)
MAX_BLOCK_M = 64
MIN_BLOCK_N = 128  # the smallest BLOCK_N of the kernels (sizes the split-K counters)
# row buckets: one configuration per bucket, chosen at load time; more rows take the last one
ROW_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)
MAX_RANK = 128  # largest low-rank rank the kernels take (one BLOCK_R tile)


@triton.jit
def load_x(x_ptr, inv_smooth_ptr, offs_m, offs_k, M, K, stride_xm, HAS_SMOOTH: tl.constexpr,
           EVEN_K: tl.constexpr):  # fmt: skip
    """x_s [BLOCK_M, BLOCK_K] = x * (1 / smooth) rounded to x's dtype, 0 past K (EVEN_K: K % TILE == 0).

    Rows past M repeat row M - 1 (no row mask: no zeroing, no predicated loads): output row m depends
    on row m of x only, and rows past M are never stored."""
    rows = tl.minimum(offs_m, M - 1)
    ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    if EVEN_K:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=offs_k[None, :] < K, other=0.0)
    if HAS_SMOOTH:
        inv = tl.load(inv_smooth_ptr + offs_k, mask=offs_k < K, other=0.0)
        x = (x.to(tl.float32) * inv[None, :]).to(x_ptr.dtype.element_ty)
    return x


@triton.jit
def dot(a, b_t, DOT_IEEE: tl.constexpr, acc=None):
    """acc + a [P, Q] @ b_t.T, fp32; DOT_IEEE: both upcast to fp32 (fp32 activations, and the
    interpreter, whose tl.dot cannot read bf16)."""
    if DOT_IEEE:
        return tl.dot(a.to(tl.float32), tl.trans(b_t.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(b_t), acc)


@triton.jit
def prologue(x_ptr, inv_smooth_ptr, xs_ptr, l2_ptr, t_ptr, lock_ptr, pid, M, K, R, stride_xm, stride_l2r,
             HAS_SMOOTH: tl.constexpr, HAS_LOWRANK: tl.constexpr, DOT_IEEE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, TILE: tl.constexpr, T_PROGS: tl.constexpr,
             T_BLOCK_K: tl.constexpr):  # fmt: skip
    """The number of prologue programs (0 without low rank and smoothing); program pid runs its part
    when it is one of them (the kernel then returns)."""
    pro_progs = 0
    if HAS_SMOOTH or HAS_LOWRANK:
        pro_progs = T_PROGS * tl.cdiv(M, BLOCK_M)
        if pid < pro_progs:
            _prologue_program(
                x_ptr, inv_smooth_ptr, xs_ptr, l2_ptr, t_ptr, lock_ptr, pid, M, K, R, stride_xm, stride_l2r,
                HAS_SMOOTH, HAS_LOWRANK, DOT_IEEE, BLOCK_M, BLOCK_R, TILE, T_PROGS, T_BLOCK_K,
            )  # fmt: skip
    return pro_progs


@triton.jit
def _prologue_program(x_ptr, inv_smooth_ptr, xs_ptr, l2_ptr, t_ptr, lock_ptr, pid, M, K, R, stride_xm,
                      stride_l2r, HAS_SMOOTH: tl.constexpr, HAS_LOWRANK: tl.constexpr, DOT_IEEE: tl.constexpr,
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
        x = load_x(x_ptr, inv_smooth_ptr, offs_m, offs_k, M, K, stride_xm, HAS_SMOOTH, False)
        if HAS_SMOOTH:
            xs_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
            tl.store(xs_ptr + offs_m[:, None] * K + offs_k[None, :], x, mask=xs_mask)
        if HAS_LOWRANK:
            l2_mask = (offs_r[:, None] < R) & (offs_k[None, :] < K)
            l2 = tl.load(l2_ptr + offs_r[:, None] * stride_l2r + offs_k[None, :], mask=l2_mask, other=0.0)
            t = dot(x, l2, DOT_IEEE, t)
    if HAS_LOWRANK:
        mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
        tl.atomic_add(t_ptr + offs_m[:, None] * BLOCK_R + offs_r[None, :], t, mask=mask, sem="relaxed")
    tl.atomic_add(lock_ptr, 1, sem="release")


@triton.jit
def smoothed_input(x_ptr, xs_ptr, lock_ptr, stride_xm, K, pro_progs, HAS_SMOOTH: tl.constexpr):
    """(pointer, row stride) of the activations a weight program reads: x_s in the scratch the prologue
    wrote (after waiting for it) with smoothing, else x."""
    if HAS_SMOOTH:
        while tl.atomic_add(lock_ptr, 0, sem="acquire") < pro_progs:
            pass
        x_ptr = xs_ptr
        stride_xm = K
    return x_ptr, stride_xm


@triton.jit
def weight_range(wid, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE: tl.constexpr,
                 SPLIT_K: tl.constexpr):  # fmt: skip
    """Weight program wid = (m, n, s): (offs_m [BLOCK_M], offs_n [BLOCK_N], k_begin, k_end, tile) of rows
    m of x, rows n of W and K range s (a whole number of TILE columns); tile = m * N tiles + n."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_k = wid % SPLIT_K
    pid_n = wid // SPLIT_K % n_tiles
    pid_m = wid // SPLIT_K // n_tiles
    tiles_per_split = tl.cdiv(tl.cdiv(K, TILE), SPLIT_K)
    k_begin = pid_k * tiles_per_split * TILE
    k_end = tl.minimum(K, k_begin + tiles_per_split * TILE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, k_begin, k_end, pid_m * n_tiles + pid_n


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
        acc += dot(l1, tl.trans(t.to(dtype)), DOT_IEEE)  # t rounded to x's dtype as the reference does
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
def finish(acc, offs_m, offs_n, tile, ws_ptr, t_ptr, l1_ptr, bias_ptr, y_ptr, lock_ptr, M, N, R, stride_l1n,
           stride_ym, pro_progs, HAS_PROLOGUE: tl.constexpr, HAS_LOWRANK: tl.constexpr,
           HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr):  # fmt: skip
    """The split-K reduction of a weight program's y.T tile acc [BLOCK_N, BLOCK_M], then (the last
    program of the tile, `weight_range`'s tile) the epilogue."""
    last = True
    if SPLIT_K > 1:
        ws = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        ws_mask = (offs_m[None, :] < M) & (offs_n < N)[:, None]
        tl.atomic_add(ws, acc, mask=ws_mask, sem="relaxed")
        counter = lock_ptr + 2 + tile
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


# fp32 split-K sums [MAX_SPLIT_ROWS * N], low-rank t [rows * MAX_RANK] and int32 counters
# [2 + row tiles * N / MIN_BLOCK_N] per device, zero between calls (each call leaves them as it found them)
_SCRATCH: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def scratch(device: torch.device, n: int, m: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared zeroed scratch tensors of `device`, large enough for N = n and M = m (grown, never
    shrunk)."""
    ws, t, lock = _SCRATCH.get(device, (None, None, None))
    if ws is None or ws.numel() < MAX_SPLIT_ROWS * n:
        ws = torch.zeros(MAX_SPLIT_ROWS * n, dtype=torch.float32, device=device)
        tiles = MAX_SPLIT_ROWS // MAX_BLOCK_M * triton.cdiv(n, MIN_BLOCK_N)
        lock = torch.zeros(2 + tiles, dtype=torch.int32, device=device)
    if t is None or t.numel() < m * MAX_RANK:
        t = torch.zeros(max(m, ROW_BUCKETS[-1]) * MAX_RANK, dtype=torch.float32, device=device)
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


def hopper_or_later(device: torch.device) -> bool:
    """Whether a CUDA device is sm_90 or later (the interpreter counts as one)."""
    return device.type == "cpu" or torch.cuda.get_device_capability(device)[0] >= 9


def multiprocessors(device: torch.device) -> int:
    """SM count of a CUDA device; 4 under the interpreter (so small test layers still split K)."""
    return 4 if device.type == "cpu" else torch.cuda.get_device_properties(device).multi_processor_count


def row_bucket(m: int) -> int:
    """The row bucket of m >= 1 rows: the smallest that holds them, the last one above it."""
    return next((b for b in ROW_BUCKETS if m <= b), ROW_BUCKETS[-1])


def split_config(m: int, n: int, k: int, tile: int, block_n: int, rank: int, smooth: bool, sms: int) -> dict:
    """Launch constexprs for the row bucket of m rows: BLOCK_M (at most 64; more rows run as row tiles);
    SPLIT_K so that about two programs per SM read the weight (never more K ranges than K tiles, none
    above MAX_SPLIT_ROWS rows); T_PROGS prologue programs (low rank or smoothing) of T_BLOCK_K columns
    each per row tile (at most 16); BLOCK_R."""
    bucket = row_bucket(m)
    block_m = min(bucket, MAX_BLOCK_M)
    tiles = triton.cdiv(k, tile)
    programs = triton.cdiv(n, block_n) * triton.cdiv(bucket, block_m)
    split = triton.next_power_of_2(triton.cdiv(2 * sms, programs)) if bucket <= MAX_SPLIT_ROWS else 1
    t_block = tile * triton.cdiv(tiles, 16)
    return dict(
        BLOCK_M=block_m,
        SPLIT_K=max(1, min(split, tiles)),
        T_PROGS=triton.cdiv(k, t_block) if rank or smooth else 0,
        T_BLOCK_K=t_block,
        BLOCK_R=max(16, triton.next_power_of_2(rank)),
    )


def launch_parts(x: torch.Tensor, n: int, block_n: int, l1, inv_smooth, bias, config: dict) -> tuple:
    """((xs, ws, t, lock) scratch, rank R, grid, mode constexprs) of a one-launch kernel for x [M, K] and
    N = n rows of W in tiles of block_n."""
    M = x.shape[0]
    ws, t, lock = scratch(x.device, n, M)
    xs = None if inv_smooth is None else smoothed_scratch(x)
    R = 0 if l1 is None else l1.shape[1]
    programs = config["T_PROGS"] + triton.cdiv(n, block_n) * config["SPLIT_K"]  # per row tile
    grid = (triton.cdiv(M, config["BLOCK_M"]) * programs,)
    modes = dict(HAS_SMOOTH=inv_smooth is not None, HAS_LOWRANK=R > 0, HAS_BIAS=bias is not None)
    return (xs, ws, t, lock), R, grid, modes
