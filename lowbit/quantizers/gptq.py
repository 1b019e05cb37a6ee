"""GPTQ rounding: Hessian-aware error feedback (Frantar et al. 2022, "GPTQ", Algorithm 1).

Minimises the layer's output error ||W X^T - Q X^T||^2 = tr((W - Q) H (W - Q)^T), H = X^T X, column by
column: column j is rounded to its nearest code, and the rounding error, divided by the j-th diagonal
entry of the upper Cholesky factor U of H^-1, is spread over the not yet quantized columns along U's
row j (eq. 3 with the Cholesky reformulation of sec. 4, "Step 3"). Updates are applied lazily in blocks
of `block_size` columns ("Step 2"). H is dampened by `damp * mean(diag(H))` on the diagonal.

Column order: by default columns are visited by descending H_jj ("act-order", the reference code's
`--act-order`): the channels with the largest inputs are rounded first, while every other column can
still absorb their error. Its scales are fitted on the original W before the loop ("static groups", the
reference code's `--static-groups`), so the stored groups stay contiguous and the checkpoint layout does
not depend on the order. On SmolLM2-135M at int3 g64 it lowers held-out perplexity from 61.8 to 39.4 out
of domain and from 71.7 to 55.4 in domain (docs/benchmarks.md, "GPTQ's column order and
clipped scales").

The static scales are fitted on W with each group's range shrunk where that lowers the group's output
error under round to nearest (AWQ's clipping search against the same H, `lowbit.quantizers.clip`): GPTQ
then rounds the unclipped W under them, the clipped-off tails being codes at the ends of the range whose
error the later columns absorb. On the same model and spec this lowers held-out perplexity further, to
28.5 out of domain and 44.5 in domain.

With `act_order=False` columns are visited in their own order and each group's scales (and zeros) are
fitted when the loop reaches the group's first column, from the current error-updated weights, as the
reference implementation does without its flags; double quantization keeps static groups either way (the
double-quantization blocks see every scale at once).
"""

from __future__ import annotations

import torch

from lowbit.quantizers.clip import clip_search
from lowbit.quantizers.qtensor import QTensor
from lowbit.quantizers.quantize import decode, encode, fit_scales, pack_qtensor
from lowbit.quantizers.spec import QuantInputError, QuantSpec

DAMP_RETRIES = 4


class GPTQError(QuantInputError):
    """GPTQ cannot run on the given inputs (bad Hessian shape, non-finite values, bad parameters)."""


def _check_inputs(W: torch.Tensor, H: torch.Tensor, block_size: int, damp: float) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.numel() == 0:
        raise GPTQError(f"W must be a non-empty matrix [N, K], got {getattr(W, 'shape', type(W).__name__)}")
    K = W.shape[1]
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (K, K):
        raise GPTQError(f"H must be [{K}, {K}] for W [N, {K}], got {getattr(H, 'shape', type(H).__name__)}")
    if not bool(torch.isfinite(H).all()):
        raise GPTQError("H contains NaN/Inf")
    if not isinstance(block_size, int) or block_size < 1:
        raise GPTQError(f"block_size must be a positive integer, got {block_size!r}")
    if not damp >= 0:
        raise GPTQError(f"damp must be >= 0, got {damp!r}")


def inverse_cholesky(
    H: torch.Tensor,
    damp: float,
    base: float | None = None,
    perm: torch.Tensor | None = None,
    dead: torch.Tensor | None = None,
) -> torch.Tensor:
    """Upper Cholesky factor U of (H' + damp * base * I)^-1, U^T U = H'_damped^-1: [K, K] fp32, column-major.

    H' is H with its rows and columns in the order `perm` (H'_ij = H[perm_i, perm_j]; None: H's own order)
    and a unit diagonal at the `dead` channels (bool [K], in H's own order; None: none). base: mean(diag H')
    unless given (summed in H's own order). When H is too ill-conditioned for float32 Cholesky, the
    dampening is raised tenfold (from at least 0.01), a few times. H is only read: H' is gathered into one
    column-major buffer (LAPACK's layout, so no call copies it) a slab of columns at a time, and the
    factorisation, the inverse and its factor are computed in that buffer, which becomes U; the working
    set is H plus one [K, K] matrix.
    """
    K = H.shape[0]
    if base is None:
        base = float(_diagonal(H, None, dead).mean())
    damps = [damp] + [max(damp, 0.01) * 10**a for a in range(1, DAMP_RETRIES)]
    A = torch.empty_strided((K, K), (1, K), dtype=H.dtype, device=H.device)  # column-major [K, K]
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for d in damps:
        _gather(A, H, perm)
        if dead is not None:
            A.diagonal()[dead if perm is None else dead[perm]] = 1.0
        A.diagonal().add_(d * base)
        torch.linalg.cholesky_ex(A, out=(A, info))  # A <- L, lower
        if int(info) == 0:
            torch.cholesky_inverse(A, out=A)  # A <- H_damped^-1
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))  # A <- U
            if int(info) == 0:
                return A
    raise GPTQError(f"H is not positive definite even with dampening {damps[-1]}")


GATHER_COLUMNS = 1024  # columns of H' gathered at once: a [K, 1024] temporary, not a second [K, K]


def _gather(A: torch.Tensor, H: torch.Tensor, perm: torch.Tensor | None) -> None:
    """A <- H[perm][:, perm] (A <- H without perm), a slab of GATHER_COLUMNS columns at a time."""
    if perm is None:
        A.copy_(H)
        return
    for c in range(0, H.shape[0], GATHER_COLUMNS):
        cols = perm[c : c + GATHER_COLUMNS]
        A[:, c : c + len(cols)] = H.index_select(1, cols).index_select(0, perm)


def _diagonal(H: torch.Tensor, perm: torch.Tensor | None, dead: torch.Tensor | None) -> torch.Tensor:
    """diag(H') [K]: H's diagonal with ones at the dead channels, in the order perm."""
    diag = torch.diag(H).clone()
    if dead is not None:
        diag[dead] = 1.0
    return diag if perm is None else diag[perm]


def _block_size(spec: QuantSpec, K: int, block_size: int, static: bool) -> int:
    """Block width such that a group fitted inside the loop starts at a block start or lies in one block."""
    gs = min(spec.group_size or K, K)
    if static or gs == K:
        return block_size
    if gs <= block_size:
        return block_size // gs * gs
    return max(d for d in range(1, block_size + 1) if gs % d == 0)


def _column(w: torch.Tensor, s: torch.Tensor, z, spec: QuantSpec, col: int) -> tuple:
    """(codes uint8 [N, 1], w_hat [N, 1]) of column `col` w [N, 1] under its group's s [N, 1] (and z). A
    family whose values depend on a column's place in its group (`Family.at_column`: K-quants' sub-block
    scales) codes it under the side parameters that put its place first."""
    at_column = spec.family.at_column
    if at_column is not None:
        z = at_column(z, spec, col % spec.group_size)
    c = encode(w, s, z, spec)
    return c, decode(c, s, z, spec)


def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    clip: bool = True,
) -> QTensor:
    """Quantize W [N, K] with GPTQ error feedback against the input Hessian H [K, K] (X^T X, fp32).

    Dead input channels (H_jj = 0) get H_jj = 1: they are decoupled from the others, rounded to
    nearest, and pass no error on. act_order: visit the columns by descending H_jj with static groups
    (module docstring); False: in their own order. clip: fit static scales on W with each group's range
    shrunk by AWQ's clipping search against H (`lowbit.quantizers.clip.clip_search`; module docstring).
    With H = identity and clip=False the result equals `quantize`.
    """
    _check_inputs(W, H, block_size, damp)
    W = W.detach().float()  # [N, K], only read: the loop works on its own copy below
    H = H.detach().float()  # [K, K], only read (dead channels and the order are applied to U's buffer)
    N, K = W.shape
    dead = torch.diag(H) <= 0  # [K]
    dead = dead if bool(dead.any()) else None
    static = act_order or spec.double_quant
    # [N, G]; refitted per group below unless static
    s, z = fit_scales(clip_search(W, H, spec) if static and clip else W, spec)
    perm = None
    if act_order:
        perm = torch.argsort(_diagonal(H, None, dead), descending=True, stable=True)
    # the one [N, K] working copy, in the visiting order (the gather is the copy: W is never cloned too)
    W = W[:, perm] if act_order else W.clone()
    order = perm.tolist() if act_order else list(range(K))  # order[j]: original column quantized j-th
    U = inverse_cholesky(H, damp, perm=perm, dead=dead)  # [K, K] upper, in the visiting order
    gs = min(spec.group_size or K, K)
    B = _block_size(spec, K, block_size, static)
    codes = torch.empty(N, K, dtype=torch.uint8, device=W.device)
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = W[:, i1:i2].clone()  # [N, B] current weights of the block
        Err1 = torch.zeros_like(W1)  # [N, B] scaled rounding errors
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            col = order[j]
            g = col // gs
            if not static and j % gs == 0:
                cur = W[:, j : j + gs] if i == 0 else W1[:, i : i + gs]  # [N, <= gs]
                sg, zg = fit_scales(cur, spec)
                s[:, g : g + 1] = sg
                if z is not None:
                    z[:, g : g + 1] = zg
            sg, zg = s[:, g : g + 1], None if z is None else z[:, g : g + 1]
            w = W1[:, i : i + 1]  # [N, 1]
            c, w_hat = _column(w, sg, zg, spec, col)  # [N, 1] each
            err = (w - w_hat)[:, 0] / U1[i, i]  # [N]
            codes[:, col] = c[:, 0]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)  # in place: no [N, K - i2] product
    return pack_qtensor(codes, s, z, spec)
