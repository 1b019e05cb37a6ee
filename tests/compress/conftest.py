"""Fixtures of the compress tests."""

import pytest
import torch

from tests.conftest import NEWS, make_tiny_llama, make_tokenizer


@pytest.fixture(scope="session")
def source(tmp_path_factory):
    """A tiny random Llama with 3 blocks and untied embeddings, saved in bf16 with save_pretrained."""
    path = tmp_path_factory.mktemp("tiny-stream")
    tok = make_tokenizer(NEWS)
    model = make_tiny_llama(len(tok), num_hidden_layers=3, tie_word_embeddings=False)
    model.to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path
