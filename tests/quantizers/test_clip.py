"""AWQ's clipping search (lowbit.quantizers.clip): it never raises a layer's output error under
round-to-nearest, and on weights with a few large entries it lowers it."""

import pytest
import torch

from lowbit.quantizers import QuantInputError, QuantSpec, dequantize, quantize
from lowbit.quantizers.clip import clip_groups, clip_search, nearest

SPECS = [
    QuantSpec("int3", 128),
    QuantSpec("int4", 32),
    QuantSpec("int2", 64),
    QuantSpec("int4", 64, symmetric=True),
    QuantSpec("nf3", 64),
    QuantSpec("int3", 48),  # K = 200: a ragged last group
]


def output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """sum_n (w_n - q_n) H (w_n - q_n)^T: the squared output error over the calibration inputs."""
    E = W - Wq
    return float(((E @ H) * E).sum())


def layer(K: int = 256, N: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] with heavy-tailed entries and H = X^T X of inputs with a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * torch.rand(N, K, generator=g).pow(4).mul(6).add(0.5)
    X = torch.randn(512, K, generator=g)
    X[:, torch.randperm(K, generator=g)[:4]] *= 10
    return W, X.T @ X


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_clip_never_raises_layer_error(spec):
    K = 200 if spec.group_size == 48 else 256
    for seed in range(3):
        W, H = layer(K, seed=seed)
        Wc = clip_search(W, H, spec)
        assert output_error(W, nearest(Wc, spec), H) <= output_error(W, nearest(W, spec), H) * (1 + 1e-6)


def test_clip_lowers_error_of_heavy_tailed_weights():
    W, H = layer()
    spec = QuantSpec("int3", 128)
    clipped = output_error(W, nearest(clip_search(W, H, spec), spec), H)
    assert clipped < 0.9 * output_error(W, nearest(W, spec), H)


def test_clip_groups_ratio_one_is_identity_and_shrinks_range():
    W, _ = layer(K=200)
    spec = QuantSpec("int3", 48)
    G = spec.groups(200)
    assert torch.equal(clip_groups(W, torch.ones(48, G), spec), W)
    half = clip_groups(W, torch.full((48, G), 0.5), spec)
    assert float(half.abs().max()) <= 0.5 * float(W.abs().max()) + 1e-6


def test_clip_search_rejects_bad_inputs():
    W, H = layer()
    with pytest.raises(QuantInputError, match="H must be"):
        clip_search(W, H[:10, :10], QuantSpec("int3", 128))
    with pytest.raises(QuantInputError, match="max_shrink"):
        clip_search(W, H, QuantSpec("int3", 128), max_shrink=1.0)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_nearest_is_quantize_then_dequantize(spec):
    W, _ = layer(K=200 if spec.group_size == 48 else 256)
    assert torch.equal(nearest(W, spec), dequantize(quantize(W, spec)))


@pytest.mark.parametrize(
    "spec", [QuantSpec("int3", 128), QuantSpec("int4", 48, double_quant=True)], ids=lambda s: s.short()
)
def test_search_in_row_chunks_equals_one_chunk(spec, monkeypatch):
    """Rows are independent: any chunk size gives the same clipped W bit for bit (with double-quantized
    scales the chunks hold whole blocks of scales, here 5 groups per row against blocks of 256)."""
    import lowbit.quantizers.clip as clip

    W, H = layer(K=240, N=300)
    whole = clip_search(W, H, spec)
    monkeypatch.setattr(clip, "CHUNK_BYTES", 4 * 240 * 7)  # 7 rows (256 with double quantization)
    assert clip._row_step(300, 240, spec) == (256 if spec.double_quant else 7)
    assert torch.equal(clip_search(W, H, spec), whole)
