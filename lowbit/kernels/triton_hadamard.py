"""The online Hadamard transform in Triton: x R for x [..., n], R = (H_m (x) H_p) / sqrt(n), the function
`lowbit.kernels.reference.hadamard_transform` defines (QuaRot's online rotation, Ashkboos et al. 2024,
sec. 4.2).

One program per row: the row as X [m, p] (m padded to BLOCK_I), log2 p butterflies (a + b, a - b) along
p (the fast Walsh-Hadamard transform, each a reshape to [.., 2, h] and a split), then H_m^T X by a dot
with the padded H_m^T (m > 1), scaled by 1 / sqrt(n); computed in float32, stored in x's dtype. Orders m
above MAX_DENSE (a [BLOCK_I, p] tile per program would not fit) use the reference's torch transform.
Importing this module imports triton (see `lowbit.kernels.triton_qlinear` on TRITON_INTERPRET).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from lowbit.kernels import reference
from lowbit.quantizers.hadamard import hadamard, online_orders

MAX_DENSE = 64


@triton.jit
def _hadamard_kernel(
    x_ptr,
    h_ptr,
    y_ptr,
    stride_xm,
    stride_ym,
    scale,
    M_PART: tl.constexpr,
    BLOCK_I: tl.constexpr,
    P: tl.constexpr,
    LOG_P: tl.constexpr,
):
    row = tl.program_id(0)
    offs_i = tl.arange(0, BLOCK_I)
    offs_p = tl.arange(0, P)
    mask = offs_i[:, None] < M_PART
    offs = offs_i[:, None] * P + offs_p[None, :]  # X [BLOCK_I, P], the row's element i * p + j
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    for h in tl.static_range(LOG_P):
        # the index bit of weight 2^h as the last axis, then H_2 on it: (a + b, a - b)
        x = tl.permute(tl.reshape(x, (BLOCK_I, P >> (h + 1), 2, 1 << h)), (0, 1, 3, 2))
        a, b = tl.split(x)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (BLOCK_I, P))
    if M_PART > 1:
        offs_k = tl.arange(0, BLOCK_I)
        ht = tl.load(h_ptr + offs_i[:, None] * BLOCK_I + offs_k[None, :])  # H_m^T, zero-padded
        if BLOCK_I >= 16:
            x = tl.dot(ht, x, input_precision="ieee")
        else:
            x = tl.sum(ht[:, :, None] * x[None, :, :], axis=1)
    tl.store(y_ptr + row * stride_ym + offs, (x * scale).to(y_ptr.dtype.element_ty), mask=mask)


@lru_cache(maxsize=16)
def _dense_transposed(m: int, block: int, device: torch.device) -> torch.Tensor:
    """H_m^T zero-padded to [block, block] float32 on `device`."""
    ht = torch.zeros(block, block, dtype=torch.float32)
    ht[:m, :m] = hadamard(m).T.float()
    return ht.to(device)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x R [..., n] for x [..., n] (float16, bfloat16 or float32), as `reference.hadamard_transform`."""
    n = x.shape[-1]
    m, p = online_orders(n)
    if m > MAX_DENSE:
        return reference.hadamard_transform(x)
    x2 = x.reshape(-1, n).contiguous()  # x2: [M, n]
    y = torch.empty_like(x2)
    if x2.shape[0] == 0:
        return y.reshape(x.shape)
    block = triton.next_power_of_2(m)
    ht = _dense_transposed(m, block, x.device)
    grid = (x2.shape[0],)
    _hadamard_kernel[grid](
        x2, ht, y, x2.stride(0), y.stride(0), n**-0.5, M_PART=m, BLOCK_I=block, P=p, LOG_P=p.bit_length() - 1
    )
    return y.reshape(x.shape)
