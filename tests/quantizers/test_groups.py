"""Group layout (ragged last group, masks, broadcasting) and scale storage (fp16 rounding, double quant)."""

import pytest
import torch

from lowbit.quantizers import DQ_BLOCK, QuantSpec
from lowbit.quantizers.groups import (
    dq_decode,
    dq_encode,
    effective_group_size,
    expand_groups,
    from_group_view,
    group_absmax,
    group_minmax,
    group_view,
    load_scales,
    round_scales,
    store_scales,
)


def test_group_view_ragged_pads_and_masks():
    w = torch.randn(3, 576)
    wg, mask = group_view(w, 128)  # 5 groups, the last with 64 real columns
    assert wg.shape == (3, 5, 128) and mask.shape == (5, 128)
    assert mask[:4].all() and mask[4, :64].all() and not mask[4, 64:].any()
    assert torch.equal(wg[:, 4, :64], w[:, 512:])
    assert torch.equal(from_group_view(wg, 576), w)


def test_group_view_is_a_view_when_aligned():
    w = torch.randn(2, 256)
    wg, mask = group_view(w, 64)
    assert wg.data_ptr() == w.data_ptr() and mask.all()


def test_expand_groups_matches_column_index():
    s = torch.arange(10.0).view(2, 5)
    e = expand_groups(s, 576, 128)
    cols = torch.arange(576) // 128
    assert torch.equal(e, s[:, cols])


def test_ragged_group_statistics_ignore_padding():
    # all-positive last group: zero padding would pull its min to 0; all-negative: its max to 0
    w = torch.rand(4, 72) + 1.0
    w[1] = -w[1]
    lo, hi = group_minmax(w, 64)
    assert torch.equal(lo[:, 1], w[:, 64:].amin(dim=1))
    assert torch.equal(hi[:, 1], w[:, 64:].amax(dim=1))
    assert torch.equal(group_absmax(w, 64)[:, 1], w[:, 64:].abs().amax(dim=1))


def test_effective_group_size():
    assert effective_group_size(QuantSpec(group_size=None), 576) == 576
    assert effective_group_size(QuantSpec(group_size=128), 576) == 128
    assert effective_group_size(QuantSpec(group_size=256), 40) == 40


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_scales_is_the_storage_round_trip(dtype):
    spec = QuantSpec(scale_dtype=dtype)
    s = torch.rand(8, 5) * 3 + 1e-3
    r = round_scales(s, spec)
    stored, dq = store_scales(r, spec)
    assert dq is None and stored.dtype == getattr(torch, dtype)
    assert torch.equal(load_scales(stored, None, spec), r)
    assert torch.equal(r, s.to(getattr(torch, dtype)).float())


def test_round_scales_never_zero_or_inf():
    for spec in (QuantSpec(scale_dtype="float16"), QuantSpec(double_quant=True)):
        s = torch.tensor([[0.0, 1e-30, 1e30, 1.0]])
        r = round_scales(s, spec)
        assert torch.isfinite(r).all() and (r > 0).all()


def test_double_quant_layout_and_idempotence():
    torch.manual_seed(0)
    s = torch.rand(37, 11) * 0.1 + 0.01  # 407 scales: one full block of 256 and a partial one
    codes, m = dq_encode(s)
    assert codes.dtype == torch.uint8 and codes.shape == s.shape and m.shape == (2,)
    flat = s.reshape(-1)
    assert torch.equal(m, torch.stack([flat[:DQ_BLOCK].max(), flat[DQ_BLOCK:].max()]))
    s_hat = dq_decode(codes, m)
    assert torch.equal(s_hat.reshape(-1)[:DQ_BLOCK].max(), m[0])
    codes2, m2 = dq_encode(s_hat)
    assert torch.equal(codes2, codes) and torch.equal(m2, m)
    assert torch.equal(dq_decode(codes2, m2), s_hat)
    # 8-bit codes against the block max: error at most half a step of m / 255
    step = m[(torch.arange(flat.numel()) // DQ_BLOCK)].view(s.shape) / 255
    assert ((s_hat - s).abs() <= step / 2 * (1 + 1e-5)).all()


def test_double_quant_keeps_small_scales_positive():
    s = torch.tensor([[1.0, 1e-6, 1e-4]])
    codes, m = dq_encode(s)
    assert (codes >= 1).all() and (dq_decode(codes, m) > 0).all()
