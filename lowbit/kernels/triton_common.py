"""Building blocks shared by the Triton kernels: weight-tile dequantization, low-rank epilogue, launch args.

The kernels read a QTensor exactly as a checkpoint stores it (no repacked copy, see
`lowbit.quantizers.packing` and `lowbit.quantizers.groups`), so `lowbit.kernels.reference` defines
every value they produce. A weight tile is read as `BLOCK_N` rows x `BLOCK_K` columns of W [N, K]:

- codes: rows are bit streams cut into words. For 2, 4 and 8 bits a word is one byte holding
  8 / bits codes; for 3 bits a word is 3 bytes holding 8 codes (a code may straddle two bytes, so the
  three bytes are joined into one 24-bit integer first). Code j of a word sits at bits
  [j * bits, (j + 1) * bits).
- scales [N, G] (G groups per row), fp16 / bf16 / fp32, or double-quantized (QLoRA): uint8 codes
  with s = dq_absmax[(n * G + g) // DQ_BLOCK] * (code / 255), computed in fp32 exactly as
  `lowbit.quantizers.groups.dq_decode` does. Asymmetric INT's zero points z [N, G] are packed at the
  codes' width as one row of N * G codes (ceil(N * G / 8) * bits bytes); z[n, g] is read from the one
  or two bytes holding bits [i * bits, (i + 1) * bits), i = n * G + g.
- values: INT s * (c - z) or s * (c - 2^(b-1)); NF s * codebook[c] (a 2^b-entry table in global
  memory); FP8 / FP4 by moving the bits into a float16 and rescaling by a power of two (exact for every
  finite code; FP8 E4M3's NaN patterns, which `quantize` never produces, read as +-480).

The dequantized tile is rounded to the activation dtype before the dot product, as the reference
dequantizes W to x.dtype.
"""

from __future__ import annotations

import os
from functools import cache

import torch
import triton
import triton.language as tl

from lowbit.quantizers import DQ_BLOCK, QTensor, codebook
from lowbit.quantizers.groups import DQ_LEVELS

# Activation dtypes the kernels accept.
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """The DOT_PRECISION constexpr for activations of `dtype`.

    "ieee": operands upcast to fp32 and multiplied exactly; for fp32 activations (a TF32 dot would not
    match the fp32 reference) and for bf16 under the CPU interpreter, whose tl.dot cannot read bf16
    (the upcast is exact, so the products are those of a bf16 dot). "tf32" otherwise, where it is
    ignored: 16-bit operands go to the tensor cores as they are.
    """
    if dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting()):
        return "ieee"
    return "tf32"


def format_constexprs(q: QTensor) -> dict:
    """The weight-format compile-time flags of a kernel launch for `q`.

    FMT: "int", "nf" or the minifloat format name; PER_CHANNEL: one group per row (G == 1), then
    GROUP_SIZE is unused.
    """
    spec = q.spec
    n_groups = spec.groups(q.shape[1])
    return dict(
        FMT=spec.kernel,
        BITS=spec.bits,
        HAS_ZEROS=spec.has_zeros,
        DOUBLE_QUANT=spec.double_quant,
        PER_CHANNEL=n_groups == 1,
        GROUP_SIZE=spec.group_size if n_groups > 1 else None,
        DQ_BLOCK=DQ_BLOCK,
        DQ_LEVELS=DQ_LEVELS,
    )


@cache
def _lookup_table(format: str, device: torch.device) -> torch.Tensor:
    return codebook(format).to(device)


def weight_args(q: QTensor, device: torch.device) -> tuple:
    """(codes, scales, zeros, dq_absmax, lut) pointers for a launch; absent parts are None."""
    lut = _lookup_table(q.spec.format, device) if q.spec.kind == "nf" else None
    fields = (q.codes, q.scales, q.zeros, q.dq_absmax)
    return tuple(None if t is None else t.contiguous() for t in fields) + (lut,)


def epilogue_args(l1, bias, dtype: torch.dtype) -> tuple:
    """(l1, bias) cast to the activation dtype as the reference casts them, and the rank r."""
    l1, bias = (None if t is None else t.to(dtype) for t in (l1, bias))
    return l1, bias, 0 if l1 is None else l1.shape[1]


def gemm_launch(x: torch.Tensor, q: QTensor, t, l1, bias, out: torch.Tensor) -> tuple[tuple, dict]:
    """(positional, keyword) launch arguments shared by the GEMM and GEMV kernels: pointers x, weight,
    t, l1, bias, out; M, N, K, G, R; strides of x, codes, t, l1; the format, mode and rank constexprs."""
    M, K = x.shape
    l1, bias, R = epilogue_args(l1, bias, x.dtype)
    codes, scales, zeros, dq_absmax, lut = weight_args(q, x.device)
    args = (x, codes, scales, zeros, dq_absmax, lut, t, l1, bias, out, M, q.shape[0], K, scales.shape[1], R,
            x.stride(0), x.stride(1), codes.stride(0), 0 if t is None else t.stride(0),
            0 if l1 is None else l1.stride(0))  # fmt: skip
    consts = dict(format_constexprs(q), HAS_LOWRANK=R > 0, HAS_BIAS=bias is not None,
                  DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_block(R))  # fmt: skip
    return args, consts


def lowrank_down(x_s: torch.Tensor, l2: torch.Tensor | None) -> torch.Tensor | None:
    """t [M, r] = x_s @ l2.T in x's dtype, the low-rank down-projection the epilogue multiplies by l1.T."""
    return None if l2 is None else x_s @ l2.to(x_s.dtype).T


def rank_block(r: int) -> int:
    """BLOCK_R for rank r: a power of two between 16 (smallest tl.dot side) and 64."""
    return min(64, max(16, triton.next_power_of_2(max(r, 1))))


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(offs_m, offs_n): rows and columns of this program's output tile, in the matmul tutorial's grouped
    order (L2 reuse)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M * K may pass 2^31 in a long prefill
    return offs_m, pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def load_codes(codes_ptr, offs_n, k0, N, K, stride_cn, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes int32 [BLOCK_N, BLOCK_K] of rows offs_n, columns k0 .. k0 + BLOCK_K (0 past the packed row).

    The tile's words are loaded (3-bit: three bytes joined into 24 bits) and split into their codes.
    """
    WORD_BYTES: tl.constexpr = 3 if BITS == 3 else 1
    CODES_PER_WORD: tl.constexpr = 8 * WORD_BYTES // BITS
    offs_w = k0 // CODES_PER_WORD + tl.arange(0, BLOCK_K // CODES_PER_WORD)  # [BLOCK_K / per word]
    row_words = (K + 7) // 8 * (8 // CODES_PER_WORD)
    mask = (offs_n[:, None] < N) & (offs_w[None, :] < row_words)
    ptrs = codes_ptr + offs_n[:, None] * stride_cn + offs_w[None, :] * WORD_BYTES
    word = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
    for b in tl.static_range(1, WORD_BYTES):
        word = word | (tl.load(ptrs + b, mask=mask, other=0).to(tl.int32) << (8 * b))
    if CODES_PER_WORD == 1:
        codes = word
    else:
        shifts = tl.arange(0, CODES_PER_WORD) * BITS
        codes = (word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes, (offs_n.shape[0], BLOCK_K))
    return codes


@triton.jit
def load_group_scales(scales_ptr, dq_absmax_ptr, offs_n, k0, N, K, G, DOUBLE_QUANT: tl.constexpr,
                      PER_CHANNEL: tl.constexpr, GROUP_SIZE: tl.constexpr, DQ_BLOCK: tl.constexpr,
                      DQ_LEVELS: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """fp32 scales of the tile at columns k0 .. k0 + BLOCK_K of rows offs_n, with their index and mask.

    Shape [BLOCK_N, 1] when the tile lies in one group (per-channel, or BLOCK_K divides the group
    size), else [BLOCK_N, BLOCK_K] (one group per column). Scales [N, G] are contiguous.
    """
    if PER_CHANNEL:
        idx = offs_n[:, None] * G
        mask = offs_n[:, None] < N
    elif GROUP_SIZE % BLOCK_K == 0:
        idx = offs_n[:, None] * G + k0 // GROUP_SIZE
        mask = offs_n[:, None] < N
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        idx = offs_n[:, None] * G + (offs_k // GROUP_SIZE)[None, :]
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if DOUBLE_QUANT:
        # s = dq_absmax[block] * (code / 255), in fp32 and in this order, as groups.dq_decode computes it
        code = tl.load(scales_ptr + idx, mask=mask, other=0).to(tl.float32)
        absmax = tl.load(dq_absmax_ptr + idx // DQ_BLOCK, mask=mask, other=0.0)
        s = absmax * tl.math.div_rn(code, DQ_LEVELS * 1.0)
    else:
        s = tl.load(scales_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    return s, idx, mask


@triton.jit
def load_zeros(zeros_ptr, idx, NG, mask, BITS: tl.constexpr):
    """Zero points int32 z at flat indices idx = n * G + g of NG = N * G BITS-bit fields packed as one
    row of codes: field i sits at bits [i * BITS, (i + 1) * BITS) of the little-endian bit stream."""
    n_bytes = (NG + 7) // 8 * BITS
    bit = idx * BITS
    ptrs = zeros_ptr + bit // 8
    field = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
    if 8 % BITS != 0:  # 3, 5, 6, 7 bits: a field may continue into the next byte
        # a field in the last byte ends there: it re-reads that byte, whose bits the mask drops
        nxt = ptrs + (bit // 8 + 1 < n_bytes).to(tl.int32)
        field = field | (tl.load(nxt, mask=mask, other=0).to(tl.int32) << 8)
    return (field >> (bit % 8)) & ((1 << BITS) - 1)


@triton.jit
def load_weight_tile(codes_ptr, scales_ptr, zeros_ptr, dq_absmax_ptr, lut_ptr, offs_n, k0, N, K, G,
                     stride_cn, FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                     DOUBLE_QUANT: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP_SIZE: tl.constexpr,
                     DQ_BLOCK: tl.constexpr, DQ_LEVELS: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Dequantized W[offs_n, k0 : k0 + BLOCK_K] in fp32: [BLOCK_N, BLOCK_K] (0 outside W)."""
    codes = load_codes(codes_ptr, offs_n, k0, N, K, stride_cn, BITS, BLOCK_K)
    s, idx, mask = load_group_scales(
        scales_ptr, dq_absmax_ptr, offs_n, k0, N, K, G,
        DOUBLE_QUANT, PER_CHANNEL, GROUP_SIZE, DQ_BLOCK, DQ_LEVELS, BLOCK_K,
    )  # fmt: skip
    # unscaled values: c - z (INT), codebook[c] (NF), the minifloat's value (FP)
    if FMT == "int":
        if HAS_ZEROS:
            z = load_zeros(zeros_ptr, idx, N * G, mask, BITS)
            v = codes.to(tl.float32) - z.to(tl.float32)
        else:
            v = (codes - (1 << (BITS - 1))).to(tl.float32)
    elif FMT == "nf":
        v = tl.load(lut_ptr + codes)
    elif FMT == "fp8_e4m3":
        # sign to bit 15, exponent and mantissa to bits 7..13: a float16 worth value * 2^-8
        h = ((codes & 0x80) << 8) | ((codes & 0x7F) << 7)
        v = h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0
    elif FMT == "fp8_e5m2":
        # E5M2 is the upper byte of a float16
        v = (codes << 8).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        tl.static_assert(FMT == "fp4_e2m1", "unknown weight format")
        # sign to bit 15, exponent and mantissa to bits 9..11: a float16 worth value * 2^-14
        h = ((codes & 0x8) << 12) | ((codes & 0x7) << 9)
        v = h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0
    return v * s


@triton.jit
def dequant_dot_range(acc, x_ptr, codes_ptr, scales_ptr, zeros_ptr, dq_absmax_ptr, lut_ptr, offs_m, offs_n,
                      k_begin, k_end, M, N, K, G, stride_xm, stride_xk, stride_cn, FMT: tl.constexpr,
                      BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                      PER_CHANNEL: tl.constexpr, GROUP_SIZE: tl.constexpr, DQ_BLOCK: tl.constexpr,
                      DQ_LEVELS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr):  # fmt: skip
    """acc [BLOCK_M, BLOCK_N] + x[offs_m, k] @ W[offs_n, k].T over k in [k_begin, k_end) in BLOCK_K
    tiles: the weight dequantized in registers and rounded to x's dtype, as the reference does."""
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=x_mask, other=0.0)
        w = load_weight_tile(
            codes_ptr, scales_ptr, zeros_ptr, dq_absmax_ptr, lut_ptr, offs_n, k0, N, K, G, stride_cn,
            FMT, BITS, HAS_ZEROS, DOUBLE_QUANT, PER_CHANNEL, GROUP_SIZE, DQ_BLOCK, DQ_LEVELS, BLOCK_K,
        )  # fmt: skip
        acc = dot_nt(x, w.to(x_ptr.dtype.element_ty), acc, BLOCK_M, DOT_PRECISION)
    return acc


@triton.jit
def dot_nt(a, b, acc, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] + a [BLOCK_M, BLOCK_K] @ b[BLOCK_N, BLOCK_K].T, fp32 accumulation.

    BLOCK_M == 1 (one activation row) uses a broadcast multiply and row sums instead of tl.dot;
    DOT_PRECISION is `dot_precision(activation dtype)`.
    """
    if BLOCK_M == 1:
        acc = acc + tl.sum(b.to(tl.float32) * a.to(tl.float32), axis=1)[None, :]
    elif DOT_PRECISION == "ieee":
        acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def add_rank_product(acc, a_ptr, b_ptr, offs_i, offs_j, I, J, R, stride_ai, stride_ar, stride_bj, stride_br,
                     BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """acc [BLOCK_I, BLOCK_J] + a[offs_i, :R] @ b[offs_j, :R].T in fp32, over R in BLOCK_R steps
    (a, b: any strides, e.g. b = l2.T with stride_bj 1, stride_br the row stride of l2)."""
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        a_mask = (offs_i[:, None] < I) & (offs_r[None, :] < R)
        a = tl.load(a_ptr + offs_i[:, None] * stride_ai + offs_r[None, :] * stride_ar, mask=a_mask, other=0.0)
        b_mask = (offs_j[:, None] < J) & (offs_r[None, :] < R)
        b = tl.load(b_ptr + offs_j[:, None] * stride_bj + offs_r[None, :] * stride_br, mask=b_mask, other=0.0)
        acc = dot_nt(a, b, acc, BLOCK_I, DOT_PRECISION)
    return acc


@triton.jit
def add_lowrank_and_bias(acc, t_ptr, l1_ptr, bias_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_l1n,
                         HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """Epilogue: acc [BLOCK_M, BLOCK_N] + t[offs_m] @ l1[offs_n].T + bias[offs_n], still in fp32."""
    if HAS_LOWRANK:
        acc = add_rank_product(acc, t_ptr, l1_ptr, offs_m, offs_n, M, N, R, stride_tm, 1, stride_l1n, 1,
                               BLOCK_M, BLOCK_R, DOT_PRECISION)  # fmt: skip
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def store_output(acc, t_ptr, l1_ptr, bias_ptr, y_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_l1n,
                 stride_ym, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """y[offs_m, offs_n] = acc [BLOCK_M, BLOCK_N] + t @ l1.T + bias in y's dtype (`add_lowrank_and_bias`)."""
    acc = add_lowrank_and_bias(
        acc, t_ptr, l1_ptr, bias_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_l1n,
        HAS_LOWRANK, HAS_BIAS, BLOCK_M, BLOCK_R, DOT_PRECISION,
    )  # fmt: skip
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y, mask=y_mask)
