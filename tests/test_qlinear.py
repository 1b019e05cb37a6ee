"""QLinear: buffers named like QTensor fields, empty construction that state dicts load into, swapping."""

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from lowbit.kernels import reference
from lowbit.nn.qlinear import QLinear, QLinearError, replace_linears, set_submodule
from lowbit.quantizers import QuantSpec, dequantize, quantize, stored_layout

SPECS = [
    QuantSpec("int4", 32),
    QuantSpec("int4", 32, symmetric=True),
    QuantSpec("int3", 64),  # K = 72: last group of 8 columns
    QuantSpec("int2", None, scale_dtype="float32"),
    QuantSpec("nf4", 64, double_quant=True),
    QuantSpec("nf3", 32, scale_dtype="bfloat16"),
    QuantSpec("fp8_e4m3", None),
    QuantSpec("fp8_e5m2", 64),
    QuantSpec("fp4_e2m1", 32),
]
N, K, R = 40, 72, 4


def make(spec, rank=R, bias=True, smooth=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(N, generator=g))
    q = quantize(lin.weight.detach(), spec)
    l1 = 0.1 * torch.randn(N, rank, generator=g) if rank else None
    l2 = 0.1 * torch.randn(rank, K, generator=g) if rank else None
    s = 0.5 + torch.rand(K, generator=g) if smooth else None
    return lin, q, QLinear.from_linear(lin, q, l1, l2, s)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_forward_equals_the_reference_and_the_dense_equivalent(spec):
    lin, q, m = make(spec)
    x = torch.randn(2, 3, K)
    y = m(x)
    assert torch.equal(y, reference.qlinear(x, q, m.l1, m.l2, m.smooth, lin.bias))
    W = (dequantize(q, torch.float64) + m.l1.double() @ m.l2.double()) / m.smooth.double()
    torch.testing.assert_close(
        y.double(), nn.functional.linear(x.double(), W, lin.bias.double()), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_state_dict_holds_exactly_the_stored_fields(spec):
    _, q, m = make(spec, rank=0, bias=False, smooth=False)
    sd = m.state_dict()
    assert set(sd) == set(q.tensors())
    for name, t in q.tensors().items():
        assert torch.equal(sd[name], t) and sd[name].dtype == t.dtype
    assert ("zeros" in sd) == (spec.kind == "int" and not spec.symmetric)
    assert ("dq_absmax" in sd) == spec.double_quant
    _, _, full = make(spec)
    assert set(full.state_dict()) == set(q.tensors()) | {"l1", "l2", "smooth", "bias"}
    assert isinstance(full.l1, nn.Parameter) and isinstance(full.bias, nn.Parameter)
    assert "smooth" in dict(full.named_buffers()) and "smooth" not in dict(full.named_parameters())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_empty_module_matches_layout_and_loads_a_state_dict(spec):
    _, q, m = make(spec)
    empty = QLinear(K, N, spec, rank=R, has_bias=True, has_smooth=True)
    src, dst = m.state_dict(), empty.state_dict()
    assert {k: (t.shape, t.dtype) for k, t in src.items()} == {k: (t.shape, t.dtype) for k, t in dst.items()}
    for field, (shape, dtype) in stored_layout(spec, N, K).items():
        assert tuple(dst[field].shape) == shape and dst[field].dtype == dtype
    empty.load_state_dict(src, strict=True)
    x = torch.randn(5, K)
    assert torch.equal(empty(x), m(x))


def test_meta_construction_then_assign_load():
    spec = QuantSpec("nf4", 64, double_quant=True)
    _, q, m = make(spec)
    empty = QLinear(K, N, spec, rank=R, has_bias=True, has_smooth=True, device="meta")
    assert all(t.is_meta for t in empty.state_dict().values())
    empty.load_state_dict(m.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in empty.state_dict().values())
    assert isinstance(empty.l1, nn.Parameter)
    x = torch.randn(3, K)
    assert torch.equal(empty(x), m(x))


def test_qtensor_round_trip_and_plan():
    spec = QuantSpec("int3", 64)
    _, q, m = make(spec)
    assert torch.equal(dequantize(m.qtensor()), dequantize(q))
    plan = m.layer_plan()
    assert json.loads(json.dumps(plan)) == plan
    assert plan == {"spec": spec.to_dict(), "shape": [N, K], "rank": R, "bias": True, "smooth": True}
    again = QLinear.from_plan(plan, torch.float32)
    assert again.layer_plan() == plan
    assert spec.short() in repr(m) and f"rank={R}" in repr(m)
    _, _, plain = make(spec, rank=0, bias=False, smooth=False)
    assert plain.layer_plan() == {
        "spec": spec.to_dict(),
        "shape": [N, K],
        "rank": 0,
        "bias": False,
        "smooth": False,
    }


def test_trainable_parts_get_the_gradients_of_the_dense_equivalent():
    _, q, m = make(QuantSpec("int4", 32))
    x = torch.randn(6, K)
    m(x).square().sum().backward()
    l1, l2, b = (t.detach().clone().requires_grad_(True) for t in (m.l1, m.l2, m.bias))
    W = dequantize(q) + l1 @ l2
    nn.functional.linear(x / m.smooth, W, b).square().sum().backward()
    for got, want in ((m.l1, l1), (m.l2, l2), (m.bias, b)):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


def test_from_linear_keeps_dtype_and_device_and_rejects_mismatches():
    spec = QuantSpec("int4", 32)
    lin, q, _ = make(spec)
    half = nn.Linear(K, N).to(torch.bfloat16)
    m = QLinear.from_linear(
        half, q, torch.zeros(N, 2, dtype=torch.bfloat16), torch.zeros(2, K, dtype=torch.bfloat16)
    )
    assert m.bias.dtype == torch.bfloat16 and m.scales.dtype == torch.float16 and m.rank == 2
    assert m(torch.randn(2, K, dtype=torch.bfloat16)).dtype == torch.bfloat16
    bad = [
        (dict(q=quantize(torch.randn(N, K + 8), spec)), "shape"),
        (dict(l1=torch.zeros(N, 2)), "both"),
        (dict(l1=torch.zeros(N, 2), l2=torch.zeros(3, K)), "low-rank"),
        (dict(smooth=torch.ones(K + 1)), "smoothing"),
        (dict(q=replace(q, zeros=None)), "lacks"),
        (dict(q=replace(q, scales=q.scales.float())), "scales"),
    ]
    for change, match in bad:
        args = dict(q=q, l1=None, l2=None, smooth=None) | change
        with pytest.raises(QLinearError, match=match):
            QLinear.from_linear(lin, args.pop("q"), **args)


def test_constructor_rejects_bad_arguments():
    spec = QuantSpec("int4", 32)
    with pytest.raises(ValueError, match="backend"):
        QLinear(K, N, spec, backend="nope")
    with pytest.raises(QLinearError, match="rank"):
        QLinear(K, N, spec, rank=-1)
    with pytest.raises(QLinearError, match="in_features"):
        QLinear(0, N, spec)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Sequential(nn.Linear(K, N), nn.ReLU(), nn.Linear(N, K)) for _ in range(2)]
        )
        self.norm = nn.LayerNorm(K)


def test_set_submodule_by_fully_qualified_name():
    model = Block()
    _, _, m = make(QuantSpec("int4", 32))
    set_submodule(model, "layers.1.0", m)
    assert model.layers[1][0] is m and isinstance(model.layers[0][0], nn.Linear)
    for fqn in ("layers.5.0", "layers.1.9", "nothing", "layers.1.0.extra"):
        with pytest.raises(QLinearError, match="no module"):
            set_submodule(model, fqn, m)


def test_replace_linears_swaps_by_name_and_checks_the_plan():
    model = Block()
    spec = QuantSpec("nf4", 64)
    entry = {"spec": spec.to_dict(), "shape": [N, K], "rank": 2, "bias": True, "smooth": False}
    replace_linears(model, {"layers.0.0": entry, "layers.1.0": entry}, dtype=torch.bfloat16, device="meta")
    for i in range(2):
        q = model.layers[i][0]
        assert (
            isinstance(q, QLinear)
            and q.layer_plan() == entry
            and q.l1.dtype == torch.bfloat16
            and q.l1.is_meta
        )
        assert isinstance(model.layers[i][2], nn.Linear)
    with pytest.raises(QLinearError, match="plan says"):
        replace_linears(model, {"layers.0.2": entry})
    with pytest.raises(QLinearError, match="not a Linear"):
        replace_linears(model, {"norm": entry})
    with pytest.raises(QLinearError, match="not a module"):
        replace_linears(model, {"layers.7.0": entry})
