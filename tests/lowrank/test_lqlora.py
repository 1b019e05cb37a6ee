"""LQ-LoRA (lowbit.lowrank.lqlora): alternating SVD and quantization beats one-shot LoRC, more rank
never hurts, and the Fisher-weighted variant wins on the weighted error it minimises."""

from itertools import pairwise

import pytest
import torch

from lowbit.lowrank import DecomposeError, decompose, fisher_error
from lowbit.quantizers import QuantSpec

SPECS = [QuantSpec("int3", 32), QuantSpec("nf4", 64), QuantSpec("fp4_e2m1", 32), QuantSpec("int2", None)]


def weight(n: int = 96, k: int = 160, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def structured_fisher(n: int = 96, k: int = 160, seed: int = 2) -> torch.Tensor:
    """A Fisher with strong row and column structure: a few rows and columns 100x more sensitive."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.where(torch.rand(n, generator=g) < 0.1, 100.0, 1.0)
    cols = torch.where(torch.rand(k, generator=g) < 0.1, 100.0, 1.0)
    return rows[:, None] * cols[None, :] * (0.5 + torch.rand(n, k, generator=g))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_more_rank_is_never_worse(spec):
    W = weight()
    errs = [decompose(W, spec, r, "lqlora", iterations=10).info["frobenius_error"] for r in (0, 1, 2, 4, 8)]
    assert all(a >= b for a, b in pairwise(errs))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
@pytest.mark.parametrize("rank", [2, 8])
def test_not_worse_than_lorc(spec, rank):
    W = weight(seed=rank)
    ours = decompose(W, spec, rank, "lqlora").info["frobenius_error"]
    assert ours <= decompose(W, spec, rank, "lorc").info["frobenius_error"]


def test_iterations_are_capped_and_reported():
    W, spec = weight(), QuantSpec("nf3", 64)
    one = decompose(W, spec, 8, "lqlora", iterations=1)
    assert one.info["iterations"] == 1
    many = decompose(W, spec, 8, "lqlora", iterations=30)
    assert 1 <= many.info["iterations"] <= 30
    assert many.info["frobenius_error"] <= one.info["frobenius_error"]
    # the reported error is the error of the returned decomposition
    assert many.info["frobenius_error"] == pytest.approx(float((W - many.weight()).square().sum()), rel=1e-5)


def test_fisher_weighted_beats_plain_on_the_weighted_error():
    W, F = weight(), structured_fisher()
    for spec in (QuantSpec("int3", 32), QuantSpec("nf4", 64)):
        plain = decompose(W, spec, 8, "lqlora", fisher=F)
        ours = decompose(W, spec, 8, "lqlora-fisher", fisher=F)
        assert ours.info["fisher_error"] < 0.8 * plain.info["fisher_error"]
        assert ours.info["fisher_error"] == pytest.approx(fisher_error(W, ours.weight(), F), rel=1e-5)


def test_fisher_variant_needs_the_fisher():
    with pytest.raises(DecomposeError, match="Fisher"):
        decompose(weight(), QuantSpec("nf4", 64), 4, "lqlora-fisher")


def test_gptq_rounding_runs_in_every_step():
    g = torch.Generator().manual_seed(1)
    Z = torch.randn(512, 8, generator=g)
    X = Z @ torch.randn(8, 160, generator=g) + 0.2 * torch.randn(512, 160, generator=g)
    H = X.T @ X
    spec = QuantSpec("int3", 32)
    ours = decompose(weight(), spec, 4, "lqlora", H=H, rounding="gptq", iterations=3)
    nearest = decompose(weight(), spec, 4, "lqlora", H=H, iterations=3)
    assert ours.info["output_error"] < nearest.info["output_error"]
