"""The calibration loss with the lm_head applied in chunks of token positions
(lowbit.compress.losses.head_loss): the same loss as the whole logits' cross-entropy, the logits of a
micro-batch never whole, and the streamed loss still equal to the in-memory one bit for bit with several
chunks."""

import functools

import pytest
import torch
from torch import nn

from lowbit.calibration import backward
from lowbit.compress import losses
from lowbit.compress.losses import Variant, calibration_loss, head_tokens, in_memory_losses, streamed_losses
from lowbit.models import load_model
from tests.compress.test_losses_stream import TOKENS, streamed
from tests.conftest import make_tiny_llama


@torch.no_grad()
def whole_logits_loss(model, tokens, batch=losses.BATCH) -> float:
    """The loss as computed before chunking: the logits [B, L, V] of a micro-batch at once."""
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch):
        ids = tokens[i : i + batch]
        logits = model(ids).logits[:, :-1].float()
        total += float(
            nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        )
        count += ids[:, 1:].numel()
    return total / count


def lm_head_rows(model) -> list[int]:
    """Records the token positions each lm_head call receives."""
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1].numel()))
    return seen


@pytest.mark.parametrize("tokens_per_chunk", [1, 7, 10_000])
@torch.no_grad()
def test_chunked_loss_equals_the_whole_logits_loss(monkeypatch, tokens_per_chunk):
    model = make_tiny_llama(300, tie_word_embeddings=False)
    tokens = torch.randint(0, 300, (6, 20), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(backward, "HEAD_CHUNK_BYTES", 4 * 300 * tokens_per_chunk)
    assert head_tokens(300) == tokens_per_chunk
    whole = whole_logits_loss(model, tokens)
    seen = lm_head_rows(model)
    assert calibration_loss(model, tokens) == pytest.approx(whole, rel=1e-6)
    want = []
    for n in (4 * 19, 2 * 19):  # two micro-batches of L-1 positions each
        q, r = divmod(n, tokens_per_chunk)
        want += [tokens_per_chunk] * q + [r] * bool(r)
    assert seen == want


def test_the_logits_of_a_micro_batch_never_exist_whole():
    """At the default chunk size, a real vocabulary's logits are computed a few hundred positions at a
    time: fp32 [T, V] of at most backward.HEAD_CHUNK_BYTES."""
    for vocab in (128256, 151936):
        t = head_tokens(vocab)
        assert 4 * t * vocab <= backward.HEAD_CHUNK_BYTES < 4 * (t + 1) * vocab
        assert t < losses.BATCH * 255  # a micro-batch of 4 blocks of 256 tokens takes several chunks


def test_streamed_losses_equal_in_memory_with_several_chunks(source, monkeypatch):
    monkeypatch.setattr(backward, "HEAD_CHUNK_BYTES", 4 * 300 * 5)  # 5 positions per chunk
    provider = streamed(source)
    skeleton, (model, _) = provider.model, load_model(str(source))
    run = functools.partial(streamed_losses, skeleton, provider)
    variants = {"f": Variant(3), "last": Variant(2)}
    got, want = run(TOKENS, variants), in_memory_losses(model, TOKENS, variants)
    assert got == want
    assert got["f"] == pytest.approx(whole_logits_loss(model, TOKENS), rel=1e-5)
