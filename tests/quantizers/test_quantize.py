"""Format-independent entry points: dispatch, self-consistency, input checks, determinism, speed."""

import time

import pytest
import torch

from lowbit import quantizers as qz
from lowbit.quantizers import FORMATS, QTensor, QuantInputError, QuantSpec, SpecError


def specs():
    for fmt, info in FORMATS.items():
        for symmetric in (False, True) if info.kind == "int" else (True,):
            yield QuantSpec(fmt, 64, symmetric)
            yield QuantSpec(fmt, None, symmetric, double_quant=True)


SPECS = list(specs())


@pytest.fixture(scope="module")
def w() -> torch.Tensor:
    return torch.randn(48, 200, generator=torch.Generator().manual_seed(0)) * 0.05


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_quantize_is_fit_encode_pack(w, spec):
    s, z = qz.fit_scales(w, spec)
    codes = qz.encode(w, s, z, spec)
    q = qz.quantize(w, spec)
    ref = qz.pack_qtensor(codes, s, z, spec)
    assert q.shape == (48, 200) and q.spec == spec
    for name, t in q.tensors().items():
        assert torch.equal(t, ref.tensors()[name]), name
    assert torch.equal(qz.unpack_codes(q), codes)
    s2, z2 = qz.decode_scales(q)  # the stored scales are exactly the ones the codes were chosen against
    assert torch.equal(s2, s) and (z is None) == (z2 is None) and (z is None or torch.equal(z2, z))
    assert torch.equal(qz.dequantize(q), qz.decode(codes, s, z, spec))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_deterministic_and_accurate(w, spec):
    q1, q2 = qz.quantize(w, spec), qz.quantize(w.clone(), spec)
    for name, t in q1.tensors().items():
        assert torch.equal(t, q2.tensors()[name])
    w_hat = qz.dequantize(q1)
    assert w_hat.dtype == torch.float32 and w_hat.shape == w.shape
    rel = ((w_hat - w).norm() / w.norm()).item()
    assert rel < {2: 0.9, 3: 0.35, 4: 0.2, 5: 0.1, 6: 0.05, 8: 0.1}[spec.bits]


def test_dtypes_in_and_out(w):
    spec = QuantSpec("int4", 64)
    w16 = w.half()
    q = qz.quantize(w16, spec)
    assert torch.equal(q.codes, qz.quantize(w16.float(), spec).codes)
    out = qz.dequantize(q, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, qz.dequantize(q).to(torch.bfloat16))


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.tensor([[1.0, float("nan")]]), "NaN/Inf"),
        (torch.tensor([[1.0, float("inf")]]), "NaN/Inf"),
        (torch.ones(8), "2-D"),
        (torch.ones(2, 8, 8), "2-D"),
        (torch.ones(0, 8), "empty"),
        (torch.ones(2, 8, dtype=torch.int32), "floating point"),
        ([[1.0]], "torch.Tensor"),
    ],
)
def test_bad_weights_rejected(bad, match):
    with pytest.raises(QuantInputError, match=match):
        qz.quantize(bad, QuantSpec())
    with pytest.raises(ValueError):
        qz.fit_scales(bad, QuantSpec("nf4"))


def test_bad_scales_and_codes_rejected(w):
    spec = QuantSpec("int4", 64)
    s, z = qz.fit_scales(w, spec)
    with pytest.raises(QuantInputError, match="shape"):
        qz.encode(w, s[:, :2], z, spec)
    with pytest.raises(QuantInputError, match="positive"):
        qz.encode(w, torch.zeros_like(s), z, spec)
    with pytest.raises(QuantInputError, match="zero points"):
        qz.encode(w, s, None, spec)
    with pytest.raises(QuantInputError, match="integers"):
        qz.encode(w, s, z + 0.5, spec)
    with pytest.raises(QuantInputError, match="no zero points"):
        qz.encode(w, s, z, QuantSpec("nf4", 64))
    with pytest.raises(QuantInputError, match="< 2\\^4"):
        qz.decode(torch.full((48, 200), 16, dtype=torch.uint8), s, z, spec)
    with pytest.raises(SpecError, match="QuantSpec"):
        qz.quantize(w, "int4")


def test_corrupt_qtensor_rejected(w):
    q = qz.quantize(w, QuantSpec("int4", 64))
    bad = QTensor(q.codes, q.scales[:, :1], q.zeros, q.dq_absmax, q.spec, q.shape)
    with pytest.raises(QuantInputError, match="scales has shape"):
        qz.dequantize(bad)
    missing = QTensor(q.codes, q.scales, None, None, q.spec, q.shape)
    with pytest.raises(QuantInputError, match="must hold"):
        qz.dequantize(missing)


def test_codebook_export():
    assert qz.codebook("nf4").shape == (16,) and qz.codebook("fp4_e2m1").shape == (16,)
    assert qz.codebook("nf2").tolist()[0] == -1.0
    with pytest.raises(SpecError, match="no codebook"):
        qz.codebook("int4")


@pytest.mark.parametrize("fmt", ["int4", "nf4", "fp8_e4m3", "fp4_e2m1"])
def test_fast(fmt):
    # about 3-30 ms on one CPU thread; one thread keeps a busy machine from stalling the thread pool,
    # and the bound only catches per-element Python loops
    w = torch.randn(1536, 576, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(fmt, 128)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            qz.quantize(w, spec)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    assert min(times) < 0.25
