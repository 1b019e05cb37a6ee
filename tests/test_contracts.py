"""Contract suites over every registry: a new format, decomposition method or export target added to
its registry is tested here without a new test.

- every format of `lowbit.quantizers.FORMATS`: quantize -> dequantize is deterministic and within a
  per-bits error bound, storage_bits equals the stored bytes of its layout, the reference kernel equals
  x @ dequantize(Q).T, and a checkpoint holding it reloads bit-identically and counts those bytes;
- every method of `lowbit.lowrank.METHODS`: the decomposition stores what its QLinear computes and, for
  the methods with a low-rank part, rank 8 is strictly better than rank 0 on the output error;
- every target of `lowbit.export.TARGETS`: a checkpoint it can hold exports, is found again by
  `find_target`, reloads with the checkpoint's logits and counts its stored bits.
"""

import math

import pytest
import torch

from lowbit.compress.recipe import DecomposeConfig, QuantizeConfig, Recipe
from lowbit.export import TARGETS, export, find_target, load_export
from lowbit.kernels import reference
from lowbit.lowrank import METHODS, decompose, output_error
from lowbit.nn import QLinear, checkpoint_info, load
from lowbit.quantizers import FORMATS, QuantSpec, dequantize, quantize, storage_bits, stored_layout
from tests.conftest import compress_recipes, logits
from tests.export.test_gguf_export import byte_tokenizer

# relative Frobenius error bound of round-to-nearest on Gaussian weights, by bits per code
ERROR_BOUND = {2: 0.75, 3: 0.4, 4: 0.2, 5: 0.1, 6: 0.05, 8: 0.08}


def gaussian(n=48, k=96, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_format_round_trip_and_exact_cost(fmt):
    spec = QuantSpec(fmt, 32)
    W = gaussian()
    q = quantize(W, spec)
    assert torch.equal(dequantize(quantize(W, spec)), dequantize(q))
    rel = float((dequantize(q) - W).norm() / W.norm())
    assert rel < ERROR_BOUND[spec.bits], f"{fmt}: relative error {rel:.3f}"
    layout = stored_layout(spec, *W.shape)
    assert set(q.tensors()) == set(layout)
    for field, t in q.tensors().items():
        assert (tuple(t.shape), t.dtype) == layout[field]
    stored = sum(t.numel() * t.element_size() * 8 for t in q.tensors().values())
    assert storage_bits(spec, W.shape) == stored


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_format_reference_kernel_is_the_definition(fmt):
    q = quantize(gaussian(), QuantSpec(fmt, 32))
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(reference.qlinear(x, q), x @ dequantize(q).T)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_format_checkpoint_reloads_bit_identically(fmt, tmp_path):
    tok = byte_tokenizer()
    recipe = Recipe(quantize=QuantizeConfig(format=fmt, group_size=32))
    root = compress_recipes(tmp_path, tok, {fmt: recipe})
    model = load(root / fmt)
    again = load(root / fmt)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert all(m.spec.format == fmt for m in model.modules() if isinstance(m, QLinear))
    info = checkpoint_info(root / fmt)["layers"]
    for name, m in model.named_modules():
        if isinstance(m, QLinear):
            stored = sum(info[name][f"{part}_bytes"] for part in ("codes", "scales", "zeros"))
            assert 8 * stored == storage_bits(m.spec, (m.out_features, m.in_features)), name


def outlier_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(64, 96, generator=g)
    X = torch.randn(256, 96, generator=g) * (1 + 8 * (torch.rand(96, generator=g) > 0.9))
    return W, X


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_stores_what_it_computes_and_rank_helps(method):
    W, X = outlier_data()
    H = X.T @ X
    F = torch.rand(W.shape, generator=torch.Generator().manual_seed(2))
    stats = dict(H=H, act_max=X.abs().amax(0), fisher=F)
    spec = QuantSpec("int3", 32)
    d8 = decompose(W, spec, 0 if method == "none" else 8, method, iterations=3, **stats)
    W_hat = dequantize(d8.q) + (0 if d8.l1 is None else d8.l1 @ d8.l2)
    W_hat = W_hat if d8.smooth is None else W_hat / d8.smooth
    torch.testing.assert_close(d8.weight(), W_hat)
    if method != "none":
        d0 = decompose(W, spec, 0, method, iterations=3, **stats)
        assert output_error(W, d8.weight(), H) < output_error(W, d0.weight(), H)


# one checkpoint every target can hold: int4 g32 symmetric (Q4_0, compressed-tensors pack-quantized)
# with a LoRC rank-4 part (a PEFT or GGUF LoRA adapter)
HELD_BY_ALL = Recipe(
    quantize=QuantizeConfig(format="int4", group_size=32, symmetric=True),
    decompose=DecomposeConfig(method="lorc", rank=4),
)


@pytest.fixture(scope="module")
def held_by_all(tmp_path_factory):
    return compress_recipes(tmp_path_factory.mktemp("contracts"), byte_tokenizer(), {"ckpt": HELD_BY_ALL})


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_exports_reloads_and_counts(name, held_by_all, tmp_path):
    pytest.importorskip("peft")
    ckpt, out = held_by_all / "ckpt", tmp_path / name
    r = export(ckpt, out, name)
    assert r["target"] == name and r["converted"] == 0
    assert find_target(out) == name
    net, tok, found = load_export(out)
    assert found == name and tok is not None
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(1))
    expected = logits(load(ckpt), ids)
    # GGUF rounds scales to fp16 and, by default, the token embedding to Q8_0 (measured 4.1e-3 of the
    # logits' scale); everything else reproduces the checkpoint's float32 computation
    bound = 6e-3 if name == "gguf" else 2e-3
    torch.testing.assert_close(logits(net, ids), expected, rtol=0, atol=bound * float(expected.abs().max()))
    bits = TARGETS[name].stored_bits(out, net)
    assert bits is not None and math.isfinite(bits) and bits > 4
