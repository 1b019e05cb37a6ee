"""Triton split-K GEMV for the quantized linear at M <= 16 rows (decode).

At a handful of activation rows the layer is memory-bound: the time is the time to read the packed
weight once. The grid is (N / BLOCK_N) x SPLIT_K programs, so a 4096-row layer still fills every
multiprocessor; program (n, s) reads the weight tile rows offs_n, K range s exactly once, dequantizes
it in registers (`triton_common.dequant_dot_range`; x comes smoothed) and applies it to all M rows
(tl.dot on M padded to 16 rows, or a broadcast multiply and row sum when M == 1). Partial sums are
added atomically into an fp32 buffer [M, N]; the programs of the first K range also add the low-rank
term t @ l1.T and the bias, so each is counted once. The buffer is cast to the output dtype at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.reference import KernelInputError
from lowbit.kernels.triton_common import add_lowrank_and_bias, dequant_dot_range, gemm_launch, interpreting
from lowbit.quantizers import QTensor

MAX_ROWS = 16  # the GEMV path's largest M


def _config(bn: int, bk: int, split_k: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k}, num_warps=warps, num_stages=3)


GEMV_CONFIGS = [
    _config(32, 128, 1, 4),
    _config(64, 128, 1, 4),
    _config(32, 256, 2, 4),
    _config(64, 128, 2, 4),
    _config(32, 128, 4, 4),
    _config(64, 256, 4, 8),
    _config(128, 128, 4, 8),
    _config(32, 128, 8, 4),
    _config(64, 64, 8, 2),
    _config(64, 128, 16, 4),
]
# The configuration the CPU interpreter runs: two K ranges, so the split-K reduction is exercised.
INTERPRETER_GEMV_CONFIG = _config(64, 64, 2, 4)


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def prune_gemv_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Keep configurations whose tiles fit (N, K), with no more K ranges than K tiles, and that launch at
    least one program per multiprocessor (all fitting ones if none does); one under the interpreter.
    K tiles lying in one scale group are preferred, as in the GEMM."""
    args = {**named_args, **kwargs}
    if interpreting():
        return [INTERPRETER_GEMV_CONFIG]
    n, k = (max(16, triton.next_power_of_2(args[d])) for d in ("N", "K"))
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_N"] <= n
        and c.kwargs["BLOCK_K"] <= k
        and c.kwargs["SPLIT_K"] <= triton.cdiv(args["K"], c.kwargs["BLOCK_K"])
    ] or [configs[0]]
    if not args["PER_CHANNEL"]:
        kept = [c for c in kept if args["GROUP_SIZE"] % c.kwargs["BLOCK_K"] == 0] or kept
    sms = _multiprocessors(args["x_ptr"].device)
    busy = [c for c in kept if triton.cdiv(args["N"], c.kwargs["BLOCK_N"]) * c.kwargs["SPLIT_K"] >= sms]
    return busy or kept


_TUNE_KEY = ["M", "N", "K", "FMT", "BITS", "GROUP_SIZE", "HAS_LOWRANK"]


@triton.autotune(
    configs=GEMV_CONFIGS,
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": prune_gemv_configs},
    reset_to_zero=["acc_ptr"],
    cache_results=True,
)
@triton.jit
def _qgemv_kernel(
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, dq_absmax_ptr, lut_ptr, t_ptr, l1_ptr, bias_ptr, acc_ptr,
    M, N, K, G, R, stride_xm, stride_xk, stride_cn, stride_tm, stride_l1n,
    FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    PER_CHANNEL: tl.constexpr, GROUP_SIZE: tl.constexpr, DQ_BLOCK: tl.constexpr, DQ_LEVELS: tl.constexpr,
    HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # K range of this program: a whole number of BLOCK_K tiles
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = pid_k * tiles_per_split * BLOCK_K
    k_end = tl.minimum(K, k_begin + tiles_per_split * BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = dequant_dot_range(
        acc, x_ptr, codes_ptr, scales_ptr, zeros_ptr, dq_absmax_ptr, lut_ptr, offs_m, offs_n, k_begin, k_end,
        M, N, K, G, stride_xm, stride_xk, stride_cn, FMT, BITS, HAS_ZEROS, DOUBLE_QUANT, PER_CHANNEL,
        GROUP_SIZE, DQ_BLOCK, DQ_LEVELS, DOT_PRECISION, BLOCK_M, BLOCK_K,
    )  # fmt: skip
    if pid_k == 0:
        acc = add_lowrank_and_bias(
            acc, t_ptr, l1_ptr, bias_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_l1n,
            HAS_LOWRANK, HAS_BIAS, BLOCK_M, BLOCK_R, DOT_PRECISION,
        )  # fmt: skip
    acc_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.atomic_add(acc_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=acc_mask)


def qgemv(x_s: torch.Tensor, q: QTensor, t=None, l1=None, bias=None, out=None, config=None) -> torch.Tensor:
    """y [M, N] = x_s @ dequantize(q).T + t @ l1.T + bias for x_s [M, K] (already smoothed), M <= 16.

    t = x_s @ l2.T [M, r]; out: optional [M, N] output in x_s.dtype; config: fixed launch parameters
    (BLOCK_N, BLOCK_K, SPLIT_K, num_warps) instead of the autotuned ones. Inputs are checked by the caller.
    """
    M, N = x_s.shape[0], q.shape[0]
    if M > MAX_ROWS:
        raise KernelInputError(f"the GEMV path takes at most {MAX_ROWS} rows, got {M}")
    acc = torch.zeros((M, N), dtype=torch.float32, device=x_s.device)  # split-K partial sums land here
    args, consts = gemm_launch(x_s, q, t, l1, bias, acc)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    kernel = _qgemv_kernel if config is None else _qgemv_kernel.fn
    kernel[grid](*args, **consts, BLOCK_M=1 if M == 1 else MAX_ROWS, **(config or {}))
    if out is None:
        return acc.to(x_s.dtype)
    return out.copy_(acc)
