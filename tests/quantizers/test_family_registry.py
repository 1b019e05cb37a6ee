"""A format family is one description plus its formats in FORMATS: a demonstration family registered here,
in this test only, passes the format contract suite without any other change to the library.

The family, "cb", stores a 2^b-entry codebook per group: s = the group's absmax (as every absmax
family), and z [N, G, 2^b] float16 values in units of s, fitted to the group's w / s by a few steps of
Lloyd's algorithm (k-means in one dimension) from an even grid over [min, max]. Each weight takes the
nearest entry of its group's codebook: c = argmin_j |w / s - z[g, j]|, w_hat = s * z[g, c]. Its
codebook is a side tensor `codebook` that no other format stores, and it has no Triton kernel.
"""

import pytest
import torch

import tests.test_contracts as contracts
from lowbit.kernels import BackendError, qlinear
from lowbit.quantizers import (
    FORMATS,
    Family,
    FormatInfo,
    QuantSpec,
    Side,
    dequantize,
    effective_group_size,
    expand_groups,
    from_group_view,
    gptq,
    group_view,
    quantize,
    round_scales,
)
from lowbit.quantizers.fake import fake_quantize, requantize

LLOYD_STEPS = 4


def _grouped(x, spec):
    """x [N, K] -> (groups [N, G, gs] zero-padded, mask bool [G, gs] of real columns)."""
    return group_view(x, effective_group_size(spec, x.shape[1]))


def _nearest(x, z, spec):
    """Index of the nearest entry of each group's codebook z [N, G, V] for every x [N, K]: [N, K] int64."""
    xg, _ = _grouped(x, spec)  # [N, G, gs]
    index = (xg[..., None] - z[:, :, None, :]).abs().argmin(-1)  # [N, G, gs]
    return from_group_view(index, x.shape[1])


def _unit(w, s, spec):
    return w.float() / expand_groups(s, w.shape[1], effective_group_size(spec, w.shape[1]))


def fit_scales(w, spec):
    s = round_scales(_grouped(w.abs(), spec)[0].amax(-1), spec)  # [N, G] absmax
    xg, mask = _grouped(_unit(w, s, spec), spec)  # [N, G, gs]
    V = 1 << spec.bits
    lo = torch.where(mask, xg, float("inf")).amin(-1, keepdim=True)
    hi = torch.where(mask, xg, -float("inf")).amax(-1, keepdim=True)
    z = lo + (hi - lo) * (torch.arange(V) + 0.5) / V  # [N, G, V]
    for _ in range(LLOYD_STEPS):
        member = ((xg[..., None] - z[:, :, None, :]).abs().argmin(-1)[..., None] == torch.arange(V)) & mask[
            ..., None
        ]  # [N, G, gs, V]
        count = member.sum(2)
        mean = (member * xg[..., None]).sum(2) / count.clamp(min=1)
        z = torch.where(count > 0, mean, z)
    return s, stored(z, spec)


def encode(w, s, z, spec):
    return _nearest(_unit(w, s, spec), z, spec).to(torch.uint8)


def decode(codes, s, z, spec):
    k = codes.shape[1]
    gs = effective_group_size(spec, k)
    zg = z.repeat_interleave(gs, dim=1)[:, :k]  # [N, K, V]: each column's group codebook
    return expand_groups(s, k, gs) * zg.gather(-1, codes.long()[..., None])[..., 0]


def inside(v, z, spec):
    k = v.shape[1]
    gs = effective_group_size(spec, k)
    return (v >= expand_groups(z.amin(-1), k, gs)) & (v <= expand_groups(z.amax(-1), k, gs))


def side_gradient(codes, z, inside, spec):
    return decode(codes, torch.ones(z.shape[:2]), z, spec)  # z[g, c]: gradient 1 at each chosen entry


def stored(z, spec):
    return z.to(torch.float16).float()


VALUES = Side("codebook", "codebook values", lambda spec: (1 << spec.bits,), torch.float16, stored, "float16")
CODEBOOK = Family(
    "cb", fit_scales, encode, decode, inside, lambda spec: 1 << (spec.bits - 1), VALUES,
    side_gradient=side_gradient,
)  # fmt: skip


@pytest.fixture
def cb(monkeypatch):
    """The family's formats cb2 and cb3, registered for this test only."""
    for bits in (2, 3):
        monkeypatch.setitem(FORMATS, f"cb{bits}", FormatInfo(CODEBOOK, bits))


@pytest.mark.parametrize("fmt", ["cb2", "cb3"])
def test_a_registered_family_passes_the_format_contract(cb, fmt, tmp_path):
    contracts.test_format_round_trip_and_exact_cost(fmt)
    contracts.test_format_reference_kernel_is_the_definition(fmt)
    contracts.test_format_checkpoint_reloads_bit_identically(fmt, tmp_path)


def test_the_family_stores_its_codebook_and_runs_on_the_reference_kernel(cb):
    spec = QuantSpec("cb2", 32, symmetric=False)
    assert spec.symmetric and spec.kind == "cb" and spec.kernel is None
    W = contracts.gaussian()
    q = quantize(W, spec)
    assert q.zeros is None and tuple(q.extra["codebook"].shape) == (48, 3, 4)
    # a learned 4-entry codebook per group beats a fixed 4-level integer grid
    assert (dequantize(q) - W).norm() < (dequantize(quantize(W, QuantSpec("int2", 32))) - W).norm()
    x = torch.randn(5, 96)
    torch.testing.assert_close(qlinear(x, q), x @ dequantize(q).T)
    with pytest.raises(BackendError, match="no Triton kernel"):
        qlinear(x, q, backend="triton")


def test_the_family_trains_and_rounds_through_the_generic_paths(cb):
    spec = QuantSpec("cb3", 32)
    W = contracts.gaussian()
    s, z = fit_scales(W, spec)
    s, z = s.requires_grad_(True), z.requires_grad_(True)
    W_hat = fake_quantize(W, s, z, spec)
    torch.testing.assert_close(W_hat, dequantize(requantize(W, s, z, spec)), rtol=0, atol=0)
    W_hat.square().sum().backward()
    assert s.grad.abs().sum() > 0 and z.grad.abs().sum() > 0
    X = torch.randn(256, 96, generator=torch.Generator().manual_seed(3))
    H = X.T @ X

    def output_error(q):
        E = dequantize(q) - W
        return float(((E @ H) * E).sum())

    assert output_error(gptq(W, H, spec)) < output_error(quantize(W, spec))
