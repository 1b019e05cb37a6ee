"""GGUF blocks of lowbit's K-quant formats (`lowbit.quantizers.kquant`): q4_k, q5_k and q6_k layers
written as llama.cpp's Q4_K, Q5_K and Q6_K, bit for bit (ggml-common.h's block_q{4,5,6}_K).

A super-block of 256 weights with codes L (as lowbit stores them), fp16 d (the group scale) and the
`kscales` bytes B becomes:

    Q4_K (144 bytes): d, B (dmin + 12 scale bytes), qs[128]: byte 32 j + l is
                      L[64 j + l] | L[64 j + 32 + l] << 4
    Q5_K (176 bytes): d, B, qh[32]: bit 2 j (2 j + 1) of byte l = bit 4 of L[64 j + l] (L[64 j + 32 + l]),
                      qs[128] as Q4_K's low nibbles
    Q6_K (210 bytes): ql[128], qh[64], B (16 int8 scales), d: in half h (weights 128 h ..), for l < 32,
                      ql[64 h + l] = L[l] & 15 | (L[l + 64] & 15) << 4, ql[64 h + 32 + l] the same for
                      L[l + 32], L[l + 96], qh[32 h + l] = the high two bits of L[l + 32 i] at bits 2 i
                      (L indexed from 128 h)
"""

from __future__ import annotations

import gguf
import torch

from lowbit.quantizers import QTensor, decode_scales, unpack_codes
from lowbit.quantizers.kquant import QK_K

Q = gguf.GGMLQuantizationType
KQUANT_TYPES = {"q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K}


def _nibbles(L: torch.Tensor) -> torch.Tensor:
    """Low nibbles of L [..., 256] in Q4_K / Q5_K order: [..., 128]."""
    L = (L & 15).view(*L.shape[:-1], 4, 2, 32)  # [.., chunk of 64, half, l]
    return (L[..., 0, :] | L[..., 1, :] << 4).flatten(-2)


def _q5_high(L: torch.Tensor) -> torch.Tensor:
    """Q5_K's qh [..., 32]: bit 2 j + half of byte l is bit 4 of L[64 j + 32 half + l]."""
    bits = (L >> 4).view(*L.shape[:-1], 8, 32)  # [.., 2 j + half, l]
    shifts = torch.arange(8, dtype=torch.uint8).view(8, 1)
    return (bits << shifts).sum(-2, dtype=torch.uint8)


def _q6_bits(L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K's (ql [..., 128], qh [..., 64]) of codes L [..., 256]."""
    L = L.view(*L.shape[:-1], 2, 4, 32)  # [.., half, quarter i, l]: L[128 half + 32 i + l]
    low = L & 15
    ql = torch.stack([low[..., 0, :] | low[..., 2, :] << 4, low[..., 1, :] | low[..., 3, :] << 4], dim=-2)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)
    qh = ((L >> 4) << shifts).sum(-2, dtype=torch.uint8)  # [.., half, 32]
    return ql.flatten(-3), qh.flatten(-2)


def kquant_blocks(q: QTensor) -> tuple[gguf.GGMLQuantizationType, torch.Tensor]:
    """(GGUF type, blocks uint8 [N, K / 256 * block bytes]) of a K-quant QTensor with K % 256 == 0."""
    N, K = q.shape
    qtype = KQUANT_TYPES[q.spec.format]
    L = unpack_codes(q).view(N, K // QK_K, QK_K)  # [N, G, 256]
    s, z = decode_scales(q)
    d = s.to(torch.float16).unsqueeze(-1).view(torch.uint8)  # [N, G, 2]
    side = z.to(torch.uint8)  # [N, G, B]
    if qtype == Q.Q6_K:
        ql, qh = _q6_bits(L)
        parts = [ql, qh, side, d]
    elif qtype == Q.Q5_K:
        parts = [d, side, _q5_high(L), _nibbles(L)]
    else:
        parts = [d, side, _nibbles(L)]
    return qtype, torch.cat(parts, dim=-1).reshape(N, -1).contiguous()
