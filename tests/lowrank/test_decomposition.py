"""The decompose entry point (lowbit.lowrank): dispatch, the W ~ (Q + L1 L2) / smooth convention, the
error functions the allocator reads, and clear errors on bad input."""

import pytest
import torch

from lowbit.lowrank import (
    METHODS,
    ROUNDINGS,
    DecomposeError,
    decompose,
    errors,
    fisher_error,
    frobenius_error,
    output_error,
    uses_gptq,
)
from lowbit.lowrank.decomposition import quantize_step
from lowbit.lowrank.error import ErrorShapeError, delta_errors
from lowbit.quantizers import QuantSpec, dequantize, gptq, quantize

N, K = 48, 96


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    X = torch.randn(256, K, generator=g)
    X[:, :2] *= 20
    return W, X, torch.rand(N, K, generator=g)


def test_errors_match_their_definitions():
    W, X, F = data()
    W_hat = W + 0.1 * torch.randn(N, K)
    D = W - W_hat
    assert frobenius_error(W, W_hat) == pytest.approx(float(D.square().sum()), rel=1e-6)
    # tr(D H D^T) with H = X^T X is the summed squared output difference over the inputs
    assert output_error(W, W_hat, X.T @ X) == pytest.approx(float((X @ D.T).square().sum()), rel=1e-4)
    assert fisher_error(W, W_hat, F) == pytest.approx(float((F * D.square()).sum()), rel=1e-6)
    assert set(errors(W, W_hat)) == {"frobenius_error"}
    assert set(errors(W, W_hat, X.T @ X, F)) == {"frobenius_error", "output_error", "fisher_error"}
    with pytest.raises(ErrorShapeError):
        output_error(W, W_hat, torch.eye(K + 1))
    with pytest.raises(ErrorShapeError):
        frobenius_error(W, W_hat[:, 1:])


def test_errors_of_the_difference_equal_the_whole_expressions_bit_for_bit():
    """delta_errors (the product taken in place) gives the expressions' values exactly."""
    W, X, F = data(1)
    W_hat = dequantize(quantize(W, QuantSpec("int3", group_size=32)))
    H = X.T @ X
    D = W - W_hat
    want = {
        "frobenius_error": float(D.square().sum()),
        "output_error": float(((D @ H) * D).sum()),
        "fisher_error": float((F * D.square()).sum()),
    }
    assert delta_errors(W - W_hat, H, F) == want == errors(W, W_hat, H, F)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("rounding", ["nearest", "gptq", "gptq-plain"])
def test_every_method_runs_and_reports_the_error_of_what_it_returns(method, rounding):
    W, X, F = data()
    H = X.T @ X
    rank = 0 if method == "none" else 4
    spec = QuantSpec("nf3", 32)
    d = decompose(
        W, spec, rank, method, H=H, act_max=X.abs().amax(0), fisher=F, rounding=rounding, iterations=3
    )
    assert d.info["method"] == method and d.info["rank"] == rank
    assert d.q.shape == (N, K) and d.q.spec == spec
    W_hat = d.weight()
    expect = dequantize(d.q) if rank == 0 else dequantize(d.q) + d.l1 @ d.l2
    if d.smooth is not None:
        expect = expect / d.smooth[None, :]
    torch.testing.assert_close(W_hat, expect)
    assert d.info["frobenius_error"] == pytest.approx(frobenius_error(W, W_hat), rel=1e-5)
    assert d.info["output_error"] == pytest.approx(output_error(W, W_hat, H), rel=1e-5)
    assert d.info["fisher_error"] == pytest.approx(fisher_error(W, W_hat, F), rel=1e-5)


@pytest.mark.parametrize("method", ["lorc", "lqlora", "svdquant"])
def test_rank_gives_strictly_better_than_rank_zero(method):
    W, X, _ = data(1)
    spec = QuantSpec("int3", 32)
    kw = dict(act_max=X.abs().amax(0), alpha=0.5)
    e0 = decompose(W, spec, 0, method, **kw).info["frobenius_error"]
    assert decompose(W, spec, 8, method, **kw).info["frobenius_error"] < e0


@pytest.mark.parametrize("method", ["lorc", "lqlora", "svdquant"])
def test_gptq_rounding_refits_the_lowrank_part_to_the_output_error(method):
    """With GPTQ, L1 L2 is refit to the output error after Q: below the same Q-then-L scheme with the
    plain (Frobenius) low-rank part of each method."""
    from lowbit.lowrank.svd import svd_r

    W, X, _ = data(1)
    H, spec, r = X.T @ X, QuantSpec("int3", 32), 6
    act_max = X.abs().amax(0)
    d = decompose(W, spec, r, method, H=H, act_max=act_max, rounding="gptq", alpha=0.5)
    smooth = torch.ones(K) if d.smooth is None else d.smooth
    Ws, Hs = W * smooth[None, :], H / smooth[:, None] / smooth[None, :]
    if method == "lorc":
        Qd = dequantize(gptq(W, H, spec))
        L1, L2 = svd_r(W - Qd, r)
    else:
        start = decompose(W, spec, r, method, act_max=act_max, alpha=0.5)  # the nearest-rounding L1 L2
        L1, L2 = start.l1, start.l2
        Qd = dequantize(gptq(Ws - L1 @ L2, Hs, spec))
    plain = output_error(W, (Qd + L1 @ L2) / smooth[None, :], H)
    assert d.info["output_error"] < 0.9 * plain


@pytest.mark.parametrize("method, rank", [("none", 0), ("lorc", 0), ("lorc", 4), ("svdquant", 4)])
@pytest.mark.parametrize("rounding", ["nearest", "gptq", "gptq-plain"])
def test_a_bfloat16_weight_decomposes_as_its_float32_copy_bit_for_bit(method, rank, rounding):
    """The compress path passes a layer's weight in its own dtype (no float32 copy held during GPTQ):
    every result equals the float32 copy's."""
    W, X, F = data(2)
    Wb, H = W.bfloat16(), X.T @ X
    kw = dict(H=H, act_max=X.abs().amax(0), fisher=F, rounding=rounding, iterations=3)
    a, b = (decompose(w, QuantSpec("int3", 32), rank, method, **kw) for w in (Wb, Wb.float()))
    assert torch.equal(a.q.codes, b.q.codes) and torch.equal(a.q.scales, b.q.scales)
    assert torch.equal(a.weight(), b.weight()) and a.info == b.info


def test_none_is_quantize():
    W, _, _ = data()
    spec = QuantSpec("int4", 32)
    d = decompose(W, spec, 0, "none")
    assert d.l1 is None and d.smooth is None and torch.equal(d.q.codes, quantize(W, spec).codes)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((4, "svd"), {}, "unknown decompose method"),
        ((2, "none"), {}, "no low-rank part"),
        ((-1, "lorc"), {}, "rank"),
        ((K + 1, "lorc"), {}, "rank"),
        ((4, "lorc"), {"rounding": "stochastic"}, "rounding"),
        ((4, "lorc"), {"rounding": "gptq"}, "Hessian"),
        ((4, "lorc"), {"H": torch.eye(K - 1)}, "H must have shape"),
        ((4, "svdquant"), {"act_max": torch.ones(K + 1)}, "act_max must have shape"),
        ((4, "lqlora-fisher"), {"fisher": torch.ones(N, K - 1)}, "fisher must have shape"),
        ((4, "lqlora"), {"iterations": 0}, "iterations"),
        ((4, "svdquant"), {"act_max": torch.ones(K), "alpha": 1.5}, "alpha"),
    ],
)
def test_bad_input_raises_one_clear_error(args, kwargs, match):
    W, _, _ = data()
    with pytest.raises(DecomposeError, match=match):
        decompose(W, QuantSpec("int4", 32), *args, **kwargs)


def test_bad_weight_raises():
    spec = QuantSpec("int4", 32)
    for W in (torch.randn(N), torch.full((N, K), float("nan")), torch.ones(N, K, dtype=torch.int32)):
        with pytest.raises(DecomposeError):
            decompose(W, spec, 0, "lorc")
    with pytest.raises(DecomposeError, match="QuantSpec"):
        decompose(torch.randn(N, K), "int4", 0, "lorc")


@pytest.mark.parametrize("rounding", [r for r in ROUNDINGS if uses_gptq(r)])
def test_each_gptq_variant_is_gptq_with_its_flags(rounding):
    """A rounding name selects GPTQ with its keyword arguments (act-order, clipped static scales)."""
    W, X, _ = data()
    H = X.T @ X
    spec = QuantSpec("int3", 32)
    want = gptq(W, H, spec, **ROUNDINGS[rounding])
    got = quantize_step(W, spec, rounding, H)
    assert torch.equal(dequantize(got), dequantize(want))
    others = [gptq(W, H, spec, **kw) for r, kw in ROUNDINGS.items() if uses_gptq(r) and r != rounding]
    assert all(not torch.equal(dequantize(got), dequantize(q)) for q in others)
