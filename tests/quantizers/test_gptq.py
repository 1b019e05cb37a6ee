"""GPTQ rounding (lowbit.quantizers.gptq): error feedback beats round-to-nearest on the output error it
minimises, reduces to round-to-nearest when H = I, and keeps the group layout for every format."""

import importlib

import pytest
import torch

from lowbit.quantizers import (
    QuantSpec,
    decode,
    decode_scales,
    dequantize,
    encode,
    fit_scales,
    quantize,
    unpack_codes,
)
from lowbit.quantizers.clip import clip_search
from lowbit.quantizers.gptq import GPTQError, gptq, inverse_cholesky

N, K = 64, 256


def correlated_inputs(n: int = 1024, k: int = K, seed: int = 0) -> torch.Tensor:
    """X [n, k] from a 16-factor model plus noise: strongly correlated input channels."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, 16, generator=g) @ torch.randn(16, k, generator=g)
    return factors + 0.3 * torch.randn(n, k, generator=g)


def weight(n: int = N, k: int = K, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def out_err(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    D = W - W_hat
    return float(((D @ H) * D).sum())


def same_qtensor(a, b) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("int3", 32),
        QuantSpec("nf4", 64),
        QuantSpec("fp4_e2m1", 32),
        QuantSpec("int4", 64, double_quant=True),
    ],
    ids=lambda s: s.short(),
)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_nearest_on_output_error(spec, act_order):
    W, X = weight(), correlated_inputs()
    H = X.T @ X
    rtn = out_err(W, dequantize(quantize(W, spec)), H)
    ours = out_err(W, dequantize(gptq(W, H, spec, act_order=act_order)), H)
    assert ours < 0.8 * rtn


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("int3", 32),
        QuantSpec("int4", None),
        QuantSpec("int3", 96, symmetric=True),
        QuantSpec("nf4", 64),
        QuantSpec("fp4_e2m1", 32),
        QuantSpec("fp8_e4m3", 128),
        QuantSpec("int4", 64, double_quant=True),
        QuantSpec("nf3", 256, scale_dtype="bfloat16"),
    ],
    ids=lambda s: s.short(),
)
def test_identity_hessian_equals_nearest_rounding(spec):
    W = weight(k=200)  # K = 200: a ragged last group for group sizes that do not divide it
    assert same_qtensor(gptq(W, torch.eye(200), spec, clip=False), quantize(W, spec))
    assert same_qtensor(gptq(W, torch.eye(200), spec, clip=False, act_order=False), quantize(W, spec))


@pytest.mark.parametrize("clip", [False, True])
def test_act_order_uses_static_groups_fitted_on_w(clip):
    """The static scales are those of W, or of W clipped by the search against H (clip)."""
    W, X = weight(), correlated_inputs()
    H = X.T @ X
    spec = QuantSpec("int4", 32)
    q = gptq(W, H, spec, act_order=True, clip=clip)
    s, z = fit_scales(clip_search(W, H, spec) if clip else W, spec)
    s_q, z_q = decode_scales(q)
    assert torch.equal(s_q, s) and torch.equal(z_q, z)


def test_clipped_scales_lower_the_output_error_where_ranges_have_outliers():
    """Weights with a few large entries per group: GPTQ under the clip-searched scales ends at a lower
    output error than under the min-max ones (the property the default relies on)."""
    W, X = weight(), correlated_inputs()
    g = torch.Generator().manual_seed(5)
    W[torch.rand(W.shape, generator=g) < 0.01] *= 6  # about one outlier in each group of 128
    H = X.T @ X
    spec = QuantSpec("int3", 128)
    clipped = out_err(W, dequantize(gptq(W, H, spec)), H)
    assert clipped < out_err(W, dequantize(gptq(W, H, spec, clip=False)), H)


@pytest.mark.parametrize("block_size", [8, 48, 128, 1000])
def test_block_size_does_not_change_the_algorithm(block_size):
    # lazy batch updates are an exact reordering of the same arithmetic: the error must match closely
    W, X = weight(), correlated_inputs()
    H = X.T @ X
    spec = QuantSpec("int3", 64)
    ref = out_err(W, dequantize(gptq(W, H, spec, block_size=128)), H)
    assert out_err(W, dequantize(gptq(W, H, spec, block_size=block_size)), H) == pytest.approx(ref, rel=0.02)


def test_ragged_groups_and_groups_wider_than_a_block():
    W = weight(k=200)
    X = correlated_inputs(k=200)
    H = X.T @ X
    for spec in (QuantSpec("int4", 64), QuantSpec("int4", 192), QuantSpec("nf4", None)):
        q = gptq(W, H, spec, block_size=32)
        assert q.shape == (N, 200) and q.scales.shape == (N, spec.groups(200))
        assert out_err(W, dequantize(q), H) < out_err(W, dequantize(quantize(W, spec)), H)


def test_dead_columns_are_rounded_to_nearest_and_pass_no_error():
    W, X = weight(), correlated_inputs()
    block = torch.arange(160, 192)  # one whole dead group of 32 columns
    dead = torch.cat([torch.tensor([0, 5, 100, 255]), block])
    X[:, dead] = 0
    H = X.T @ X
    spec = QuantSpec("int4", 32)
    q = gptq(W, H, spec)
    W_hat = dequantize(q)
    assert torch.isfinite(W_hat).all()
    s, z = decode_scales(q)
    for j in dead.tolist():
        g = slice(j // 32, j // 32 + 1)
        want = decode(encode(W[:, j : j + 1], s[:, g], z[:, g], spec), s[:, g], z[:, g], spec)
        assert torch.equal(W_hat[:, j : j + 1], want)
    # other values in the dead group change no other code: its columns pass no error on
    W2 = W.clone()
    W2[:, block] = 3 * torch.randn(N, len(block))
    live = torch.ones(K, dtype=torch.bool)
    live[block] = False
    assert torch.equal(unpack_codes(gptq(W2, H, spec))[:, live], unpack_codes(q)[:, live])


def test_rank_deficient_hessian_is_dampened():
    W = weight()
    X = torch.randn(8, K)  # rank 8 << K: singular H
    q = gptq(W, X.T @ X, QuantSpec("int4", 64), damp=0.0)
    assert torch.isfinite(dequantize(q)).all()


@pytest.mark.parametrize(
    "H, kwargs",
    [(torch.eye(K - 1), {}), (torch.full((K, K), float("nan")), {}), (torch.eye(K), {"block_size": 0})],
    ids=["shape", "nan", "block"],
)
def test_bad_input_raises_value_error(H, kwargs):
    with pytest.raises(GPTQError):
        gptq(weight(), H, QuantSpec("int4", 64), **kwargs)
    assert issubclass(GPTQError, ValueError)


@pytest.mark.parametrize("damp", [0.01, 0.0])
def test_inverse_cholesky_in_one_buffer_equals_the_textbook_chain(damp):
    """U = chol(chol_inverse(chol(H + d mean(diag H) I)), upper), the chain of separate matrices GPTQ's
    reference code runs, bit for bit; H is left as it was."""
    X = torch.randn(8, K, generator=torch.Generator().manual_seed(2))  # rank 8: damp=0 must retry
    for H in (correlated_inputs().T @ correlated_inputs(), X.T @ X):
        before = H.clone()
        base = float(torch.diag(H).mean())
        for d in [damp] + [max(damp, 0.01) * 10**a for a in range(1, 4)]:
            L, info = torch.linalg.cholesky_ex(H + d * base * torch.eye(K))
            if int(info) == 0:
                break
        want = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        got = inverse_cholesky(H, damp)
        assert torch.equal(got, want) and torch.equal(H, before)
        assert torch.allclose(got.T @ got @ (H + d * base * torch.eye(K)), torch.eye(K), atol=1e-2)


def test_gptq_leaves_its_hessian_unchanged():
    """gptq reads H without a working copy of it, unless it must change it (dead channels, act-order)."""
    X = correlated_inputs()
    X[:, 3] = 0  # a dead channel
    H = X.T @ X
    before = H.clone()
    for act_order in (False, True):
        gptq(weight(), H, QuantSpec("int4", 64), act_order=act_order)
        assert torch.equal(H, before)


def test_inverse_cholesky_gathers_the_order_and_dead_channels_in_slabs(monkeypatch):
    """perm and dead factor H' = H[perm][:, perm] with unit dead diagonals bit for bit, whatever the slab."""
    G = importlib.import_module("lowbit.quantizers.gptq")  # the package binds the name to the function
    X = correlated_inputs()
    X[:, [3, 77]] = 0
    H = X.T @ X
    dead = torch.diag(H) <= 0
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(3))
    Hp = H.clone()
    Hp[dead, dead] = 1.0
    base = float(torch.diag(Hp).mean())
    want = inverse_cholesky(Hp[perm][:, perm].contiguous(), 0.01, base)
    monkeypatch.setattr(G, "GATHER_COLUMNS", 7)  # slabs that do not divide K
    before = H.clone()
    assert torch.equal(inverse_cholesky(H, 0.01, perm=perm, dead=dead), want)
    assert torch.equal(H, before)


def test_act_order_rounds_the_largest_input_channel_to_nearest():
    """The column with the largest H_jj is visited first: it receives no error, so its codes are the
    nearest codes under the static scales; the natural order visits it late and changes some of them."""
    W, X = weight(), correlated_inputs()
    X[:, 200] *= 8  # channel 200 dominates the diagonal
    H = X.T @ X
    spec = QuantSpec("int3", 32)
    s, z = fit_scales(W, spec)
    g = slice(200 // 32, 200 // 32 + 1)
    nearest = encode(W[:, 200:201], s[:, g], z[:, g], spec)[:, 0]
    assert torch.equal(unpack_codes(gptq(W, H, spec, clip=False))[:, 200], nearest)
    assert not torch.equal(unpack_codes(gptq(W, H, spec, act_order=False, clip=False))[:, 200], nearest)
