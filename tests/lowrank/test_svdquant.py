"""SVDQuant (lowbit.lowrank.svdquant): smoothing migrates planted activation outliers into the weights,
the low-rank branch absorbs them, and the layer's output error falls."""

import pytest
import torch

from lowbit.lowrank import (
    DecomposeError,
    decompose,
    output_error,
    shared_smoothing,
    smoothing_factors,
    svdquant,
)
from lowbit.lowrank.decomposition import DecomposeOptions, Stats
from lowbit.lowrank.svdquant import ALPHAS, svdquant_smoothed
from lowbit.quantizers import QuantSpec, dequantize

N, K = 96, 192


def layer(seed: int = 0):
    """W [N, K] and calibration inputs X [512, K] with 4 outlier channels 50x larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    X = torch.randn(512, K, generator=g)
    X[:, torch.randperm(K, generator=g)[:4]] *= 50
    return W, X


def test_smoothing_factors():
    W, X = layer()
    amax = X.abs().amax(0)
    wmax = W.abs().amax(0)
    for alpha in (0.0, 0.3, 1.0):
        lam = smoothing_factors(amax, W, alpha)
        assert float(lam.log().mean()) == pytest.approx(0.0, abs=1e-5)  # geometric mean 1
        ratio = lam * wmax ** (1 - alpha) / amax**alpha  # constant across channels
        torch.testing.assert_close(ratio, ratio.mean().expand(K), rtol=1e-4, atol=0)
    amax[:3] = 0
    W[:, 5] = 0
    assert torch.isfinite(smoothing_factors(amax, W, 0.5)).all()


@pytest.mark.parametrize(
    "spec", [QuantSpec("int4", 64), QuantSpec("nf4", 64), QuantSpec("fp4_e2m1", 32)], ids=lambda s: s.short()
)
def test_smoothing_beats_no_smoothing_on_output_error(spec):
    W, X = layer()
    H = X.T @ X
    stats = Stats(H=H, act_max=X.abs().amax(0))
    ours = decompose(W, spec, 8, "svdquant", H=H, act_max=stats.act_max)
    plain = svdquant_smoothed(W, spec, 8, None, stats, "nearest")
    alpha0 = decompose(W, spec, 8, "svdquant", H=H, act_max=stats.act_max, alpha=0.0)
    assert ours.smooth is not None and ours.info["alpha"] > 0
    assert ours.info["output_error"] < 0.5 * plain.info["output_error"]
    assert ours.info["output_error"] < 0.5 * alpha0.info["output_error"]


def test_layer_convention_and_output_error_match_the_inputs():
    W, X = layer(1)
    H = X.T @ X
    d = decompose(W, QuantSpec("int4", 64), 8, "svdquant", H=H, act_max=X.abs().amax(0))
    # the layer computes x_s @ (Q + L1 L2)^T with x_s = x / smooth
    y = (X / d.smooth[None, :]) @ (dequantize(d.q) + d.l1 @ d.l2).T
    torch.testing.assert_close(y, X @ d.weight().T, rtol=1e-4, atol=1e-2)
    direct = float((X @ W.T - y).square().sum())
    assert d.info["output_error"] == pytest.approx(direct, rel=1e-3)
    assert d.info["output_error"] == pytest.approx(output_error(W, d.weight(), H), rel=1e-6)


def test_without_hessian_alpha_is_fixed():
    W, X = layer()
    d = decompose(W, QuantSpec("int4", 64), 4, "svdquant", act_max=X.abs().amax(0))
    assert d.info["alpha"] == 0.5 and "output_error" not in d.info
    torch.testing.assert_close(d.smooth, smoothing_factors(X.abs().amax(0), W, 0.5))
    with pytest.raises(DecomposeError, match="act_max"):
        decompose(W, QuantSpec("int4", 64), 4, "svdquant")


def test_gptq_rounding_uses_the_smoothed_hessian():
    W, X = layer(2)
    H = X.T @ X
    args = dict(H=H, act_max=X.abs().amax(0), alpha=0.5)
    nearest = decompose(W, QuantSpec("int3", 32), 8, "svdquant", **args)
    ours = decompose(W, QuantSpec("int3", 32), 8, "svdquant", rounding="gptq", **args)
    torch.testing.assert_close(ours.smooth, nearest.smooth)
    assert ours.info["output_error"] < 0.9 * nearest.info["output_error"]


def test_more_rank_lowers_the_output_error():
    W, X = layer(3)
    H = X.T @ X
    kw = dict(H=H, act_max=X.abs().amax(0), alpha=0.5)
    errs = [decompose(W, QuantSpec("int3", 32), r, "svdquant", **kw) for r in (0, 16)]
    assert errs[1].info["output_error"] < errs[0].info["output_error"]
    assert errs[0].l1 is None and errs[1].l1.shape == (N, 16)


def group(seed: int = 0):
    """Three weights reading one input X [512, K] with planted outliers (q/k/v-like), each with its own
    spec and rank; the second has larger columns, so the group's column maxima are not any one member's."""
    W, X = layer(seed)
    g = torch.Generator().manual_seed(seed + 100)
    W2 = 3 * torch.randn(N // 2, K, generator=g)
    W2[:, :8] *= 10
    Ws = [W, W2, torch.randn(64, K, generator=g)]
    specs = [QuantSpec("int3", 32), QuantSpec("int4", 64), QuantSpec("nf4", 32)]
    return Ws, specs, [8, 4, 0], Stats(H=X.T @ X, act_max=X.abs().amax(0))


def summed_error(Ws, specs, ranks, smooth, stats) -> float:
    members = zip(Ws, specs, ranks, strict=True)
    return sum(
        svdquant_smoothed(W, s, r, smooth, stats, "nearest").info["output_error"] for W, s, r in members
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_smoothing_beats_every_members_own(seed):
    Ws, specs, ranks, stats = group(seed)
    lam, alpha = shared_smoothing(Ws, specs, ranks, stats)
    torch.testing.assert_close(lam, smoothing_factors(stats.act_max, torch.cat(Ws), alpha))
    ours = summed_error(Ws, specs, ranks, lam, stats)
    for W, spec, r in zip(Ws, specs, ranks, strict=True):  # one member's own lambda for the whole group
        own = svdquant(W, spec, r, stats, DecomposeOptions()).smooth
        assert ours <= summed_error(Ws, specs, ranks, own, stats)
    for a in ALPHAS:  # and the search found the grid's best
        assert ours <= summed_error(
            Ws, specs, ranks, smoothing_factors(stats.act_max, torch.cat(Ws), a), stats
        )
    assert ours <= summed_error(Ws, specs, ranks, None, stats)


@pytest.mark.parametrize(
    "stats_kw, opts",
    [
        ({"H": True}, DecomposeOptions()),
        ({"H": True}, DecomposeOptions(rounding="gptq")),
        ({"H": True}, DecomposeOptions(alpha=0.3)),
        ({}, DecomposeOptions()),
    ],
    ids=["searched", "gptq", "alpha", "no-hessian"],
)
def test_a_group_of_one_is_svdquant(stats_kw, opts):
    W, X = layer(4)
    stats = Stats(H=X.T @ X if stats_kw else None, act_max=X.abs().amax(0))
    spec = QuantSpec("int3", 32)
    d = svdquant(W, spec, 8, stats, opts)
    lam, alpha = shared_smoothing([W], [spec], [8], stats, opts)
    assert torch.equal(lam, d.smooth) and alpha == d.info["alpha"]
    ours = svdquant_smoothed(W, spec, 8, lam, stats, opts.rounding)
    assert torch.equal(ours.q.codes, d.q.codes) and torch.equal(ours.l1, d.l1)


def test_shared_smoothing_refuses_mismatched_groups():
    Ws, specs, ranks, stats = group()
    with pytest.raises(DecomposeError, match="one spec and one rank per weight"):
        shared_smoothing(Ws, specs[:2], ranks, stats)
    with pytest.raises(DecomposeError, match="H must have shape"):
        shared_smoothing([Ws[0], Ws[0][:, :-1]], specs[:2], ranks[:2], stats)
