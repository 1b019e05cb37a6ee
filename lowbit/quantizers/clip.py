"""Clipping search of AWQ (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression
and Acceleration", sec. 3.3 and its released `auto_clip`): shrink each group's weight range before
round-to-nearest when that lowers the layer's output error on calibration inputs.

For row n and group g of W [N, K] (columns c_g), a ratio r in R = {1, 1 - 1/grid, ..., 1 - max_shrink}
clamps the group to [r lo_ng, r hi_ng] (lo, hi: the group's min and max; AWQ's released code clamps to
[-r absmax, r absmax], the same for a symmetric format) and rounds the clamped group to nearest, Q_r.
The ratio minimises the group's share of the output error,

    r*_ng = argmin_{r in R} e_r H_gg e_r^T,  e_r = W[n, c_g] - Q_r(W)[n, c_g],  H_gg = X[:, c_g]^T X[:, c_g],

which is AWQ's objective sum_t (x_t[c_g] . e_r)^2 over the calibration tokens x_t, written with the
diagonal block of the input Hessian H = X^T X instead of the tokens themselves. Choosing groups one by one
ignores the cross-group terms e_g H_gh e_h^T, so a last check keeps each row's clipping only where its full
output error e H e^T is not above round-to-nearest's: the search never raises the layer's output error.
"""

from __future__ import annotations

import math

import torch

from lowbit.quantizers.groups import (
    DQ_BLOCK,
    effective_group_size,
    expand_groups,
    group_minmax,
    group_view,
)
from lowbit.quantizers.quantize import fit_scales
from lowbit.quantizers.spec import QuantInputError, QuantSpec


def nearest(W: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of W [N, K] (float32), without packing the codes or checking
    the intermediate codes and scales again (the searches call it thousands of times)."""
    family = spec.family
    s, z = fit_scales(W, spec)
    return family.decode(family.encode(W.float(), s, z, spec), s, z, spec)


def clip_groups(W: torch.Tensor, ratio: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """W [N, K] with every group clamped to [ratio lo, ratio hi]; ratio: [N, G] (1 keeps the group)."""
    K = W.shape[1]
    gs = effective_group_size(spec, K)
    lo, hi = group_minmax(W, gs)  # [N, G]
    lo, hi = lo.clamp(max=0.0) * ratio, hi.clamp(min=0.0) * ratio
    return torch.minimum(torch.maximum(W, expand_groups(lo, K, gs)), expand_groups(hi, K, gs))


def _group_errors(E: torch.Tensor, Hg: torch.Tensor, gs: int) -> torch.Tensor:
    """e H_gg e^T for every row and group of the error E [N, K]; Hg: [G, gs, gs] -> [N, G]."""
    Eg, _ = group_view(E, gs)  # [N, G, gs], zero-padded
    return torch.einsum("ngi,gij,ngj->ng", Eg, Hg, Eg)


def _diagonal_blocks(H: torch.Tensor, gs: int) -> torch.Tensor:
    """The G diagonal blocks [G, gs, gs] of H [K, K] (zero-padded past K)."""
    K = H.shape[0]
    Hg = H.new_zeros(-(-K // gs), gs, gs)  # copied block by block: no padded copy of the whole H
    for g, a in enumerate(range(0, K, gs)):
        b = min(a + gs, K)
        Hg[g, : b - a, : b - a] = H[a:b, a:b]
    return Hg


CHUNK_BYTES = 8 << 20  # rows searched at once: fp32 [rows, K] temporaries of at most this size


def _row_step(N: int, K: int, spec: QuantSpec) -> int:
    """Rows per chunk of the search: about CHUNK_BYTES of fp32 [rows, K], and with double-quantized
    scales a multiple of the rows whose scales fill whole DQ_BLOCK blocks (the blocks stay as whole-W's)."""
    rows = max(1, CHUNK_BYTES // (4 * K))
    if spec.double_quant:
        G = spec.groups(K)
        align = DQ_BLOCK // math.gcd(G, DQ_BLOCK)
        rows = max(align, rows // align * align)
    return min(rows, N)


@torch.no_grad()
def clip_search(
    W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5
) -> torch.Tensor:
    """W [N, K] with each group's range shrunk by the ratio r*_ng (module docstring) that minimises the
    group's output error e H_gg e^T under round-to-nearest; H [K, K] is the layer's input Hessian X^T X.

    Ratios 1 - i / grid for i = 0 .. int(max_shrink * grid) - 1 (AWQ: grid 20, max_shrink 0.5). Rows whose
    clipped output error e H e^T would exceed round-to-nearest's are returned unclipped. float32. Rows are
    independent: they are searched a chunk at a time (`CHUNK_BYTES`), so the temporaries stay a few
    [rows, K] whatever N is (a 4096 x 14336 weight would otherwise hold several [N, K] copies at once).
    """
    W = W.detach().float()
    N, K = W.shape
    if tuple(H.shape) != (K, K):
        raise QuantInputError(f"H must be [{K}, {K}] for a weight of shape {tuple(W.shape)}")
    if grid < 1 or not 0.0 <= max_shrink < 1.0:
        raise QuantInputError("clip search needs grid >= 1 and 0 <= max_shrink < 1")
    H = H.detach().float().to(W.device)
    gs = effective_group_size(spec, K)
    Hg = _diagonal_blocks(H, gs)
    out = torch.empty_like(W)
    step = _row_step(N, K, spec)
    for a in range(0, N, step):
        out[a : a + step] = _clip_rows(W[a : a + step], H, Hg, spec, grid, max_shrink)
    return out


def _clip_rows(
    W: torch.Tensor, H: torch.Tensor, Hg: torch.Tensor, spec: QuantSpec, grid: int, max_shrink: float
) -> torch.Tensor:
    """`clip_search` of the rows W [R, K]; Hg: H's diagonal blocks [G, gs, gs]."""
    R, K = W.shape
    gs = effective_group_size(spec, K)
    G = Hg.shape[0]
    best_err = torch.full((R, G), float("inf"), device=W.device)
    best = torch.ones(R, G, device=W.device)
    for i in range(max(1, int(max_shrink * grid))):
        r = torch.full((R, G), 1.0 - i / grid, device=W.device)
        err = _group_errors(W - nearest(clip_groups(W, r, spec), spec), Hg, gs)  # [R, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, r, best)
    clipped = clip_groups(W, best, spec)
    # the per-group choice ignores cross-group terms: keep a row's clipping only where e H e^T does not rise
    keep = _output_errors(W - nearest(clipped, spec), H) <= _output_errors(W - nearest(W, spec), H)  # [R]
    clipped[~keep] = W[~keep]  # in place: the rows whose clipping is dropped
    return clipped


def _output_errors(E: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """e H e^T of every row e of E [N, K] -> [N], with one [N, K] product beside E."""
    EH = E @ H  # [N, K]
    return EH.mul_(E).sum(1)
