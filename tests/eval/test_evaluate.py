import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lowbit.eval.perplexity import EvalError, dense_bits_per_weight, perplexity, windows
from tests.conftest import make_tiny_llama


class Uniform(nn.Module):
    """Zero logits over `vocab` tokens: every next token has probability 1/vocab. Records input shapes."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.shapes = vocab, []

    def forward(self, x, **kwargs):
        self.shapes.append(tuple(x.shape))
        return SimpleNamespace(logits=torch.zeros(*x.shape, self.vocab))


class Successor(nn.Module):
    """Probability p on token x+1 (mod V), the rest spread evenly: right wherever tokens count up."""

    def __init__(self, vocab: int, p: float):
        super().__init__()
        self.vocab, self.p = vocab, p

    def forward(self, x, **kwargs):
        probs = torch.full((*x.shape, self.vocab), (1 - self.p) / (self.vocab - 1))
        probs.scatter_(-1, ((x + 1) % self.vocab)[..., None], self.p)
        return SimpleNamespace(logits=probs.log())


@pytest.mark.parametrize("vocab", [7, 128, 1000])
def test_uniform_logits_give_the_vocabulary_size(vocab):
    r = perplexity(Uniform(vocab), torch.randint(0, vocab, (1000,)), seq_len=64, progress=False)
    assert r["perplexity"] == pytest.approx(vocab, rel=1e-6)


@pytest.mark.parametrize(
    "T, seq_len, predicted",
    [(1000, 100, 990), (1001, 100, 990), (1002, 100, 991), (64, 64, 63), (2, 64, 1), (130, 64, 127)],
)
def test_windowing_predicts_every_token_but_each_windows_first(T, seq_len, predicted):
    model = Uniform(11)
    r = perplexity(model, torch.zeros(T, dtype=torch.long), seq_len=seq_len, batch_size=3, progress=False)
    assert r["tokens"] == predicted
    spans = windows(T, seq_len)
    assert predicted == T - len(spans) - (1 if T % seq_len == 1 else 0)
    assert sum(b * (n - 1) for b, n in model.shapes) == predicted
    assert all(n <= seq_len for _, n in model.shapes)


def test_windows_tile_the_tokens_without_overlap():
    spans = windows(1030, 256)
    assert spans == [(0, 256), (256, 512), (512, 768), (768, 1024), (1024, 1030)]
    assert windows(1025, 256)[-1] == (768, 1024)


def test_context_does_not_cross_windows():
    # Tokens count up except at window starts; the successor model is then right on every predicted token.
    V, seq_len, p = 50, 10, 0.9
    tokens = torch.cat([torch.arange(k, k + seq_len) % V for k in range(0, 70, 7)])
    r = perplexity(Successor(V, p), tokens, seq_len=seq_len, progress=False)
    assert r["perplexity"] == pytest.approx(1 / p, rel=1e-6)
    shifted = perplexity(Successor(V, p), tokens[3:], seq_len=seq_len, progress=False)
    assert shifted["perplexity"] > 1 / p


def test_matches_the_models_own_loss_and_ignores_batch_size():
    torch.manual_seed(0)
    model = make_tiny_llama(vocab_size=96)
    tokens = torch.randint(0, 96, (700,))
    results = [perplexity(model, tokens, seq_len=128, batch_size=b, progress=False) for b in (1, 2, 4, 16)]
    ppls = [r["perplexity"] for r in results]
    assert ppls == pytest.approx([ppls[0]] * 4, rel=1e-5)
    with torch.no_grad():
        nll = sum(
            model(tokens[a:b][None], labels=tokens[a:b][None]).loss.double() * (b - a - 1)
            for a, b in windows(700, 128)
        )
    assert ppls[0] == pytest.approx(math.exp(nll / results[0]["tokens"]), rel=1e-5)


def test_low_precision_models_are_scored_in_fp32():
    model = make_tiny_llama(vocab_size=96)
    tokens = torch.randint(0, 96, (300,))
    ref = perplexity(model, tokens, seq_len=100, progress=False)["perplexity"]
    low = perplexity(model.to(torch.bfloat16), tokens, seq_len=100, progress=False)["perplexity"]
    assert math.isfinite(low) and low == pytest.approx(ref, rel=0.05)


def test_restores_training_mode():
    model = Uniform(5).train()
    perplexity(model, torch.zeros(20, dtype=torch.long), seq_len=8, progress=False)
    assert model.training


@pytest.mark.parametrize("T, seq_len, batch", [(1, 8, 1), (0, 8, 1), (10, 1, 1), (10, 8, 0)])
def test_bad_input_raises_eval_error(T, seq_len, batch):
    with pytest.raises(EvalError):
        perplexity(Uniform(3), torch.zeros(T, dtype=torch.long), seq_len=seq_len, batch_size=batch)


def test_dense_bits_per_weight_follows_the_dtype():
    model = make_tiny_llama(vocab_size=64)
    assert dense_bits_per_weight(model) == 32
    assert dense_bits_per_weight(model.to(torch.bfloat16)) == 16
    with pytest.raises(EvalError):
        dense_bits_per_weight(nn.ReLU())
