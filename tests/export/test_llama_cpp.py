"""GGUF exports run in llama.cpp itself (llama-cpp-python; skipped where it is not installed).

llama.cpp's CPU path multiplies Q4 / Q8 weights with activations it rounds to 8 bits per block (Q8_0 /
Q8_1), so its logits differ from lowbit's float32 ones by that rounding: the bounds below are relative to
the logits' scale (tiny model) or on perplexity (built-in model). On machines whose CPU advertises
instructions it cannot run (AMX here), llama.cpp's extra buffer types are turned off.
"""

import math

import numpy as np
import pytest
import torch

from lowbit.export import export
from lowbit.nn.checkpoint import load, load_tokenizer
from tests.export.test_targets import _compress
from tests.models.test_models import needs_builtin

llama_cpp = pytest.importorskip("llama_cpp")


def open_gguf(path, **kw):
    """llama.cpp on the CPU, every position's logits kept, quietly."""
    return llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, verbose=False, use_extra_bufts=False, **kw)


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    """float32 [len(ids), vocab]: the logits llama.cpp computes at each position."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def assert_runs_like_lowbit(ckpt, model_file) -> None:
    """llama.cpp's logits of the export on 32 ids within 5% of their scale of lowbit's on the checkpoint,
    the same argmax at 90% of the positions."""
    ids = list(range(3, 35))
    with torch.no_grad():
        want = load(ckpt)(torch.tensor([ids])).logits[0].float().numpy()
    got = llama_cpp_logits(open_gguf(model_file), ids)
    diff, agree = np.abs(got - want).max() / np.abs(want).max(), (got.argmax(-1) == want.argmax(-1)).mean()
    print(
        f"llama.cpp vs lowbit: max logit difference {diff:.4f} of their scale, argmax agreement {agree:.3f}"
    )
    assert diff < 0.05 and agree >= 0.9


def test_budget_export_for_llama_cpp_runs_there_with_lowbit_s_logits(tmp_path):
    from tests.conftest import make_tiny_llama
    from tests.export.test_gguf_export import byte_tokenizer

    source, tok = tmp_path / "source", byte_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(source)
    tok.save_pretrained(source)
    out = _compress(source, tmp_path, "llama.cpp", "5.0")
    export(out, tmp_path / "gguf", "gguf")
    assert_runs_like_lowbit(out, tmp_path / "gguf" / "model.gguf")


def test_k_quant_export_runs_in_llama_cpp_with_lowbit_s_logits(tmp_path):
    """Q4_K / Q5_K / Q6_K layers (a wide tiny Llama: every K a multiple of 256) and the default Q6_K token
    embedding, in llama.cpp: logits within a few percent of their scale of lowbit's (llama.cpp rounds
    activations to 8 bits for its K-quant dot products; lowbit's are float32, its embedding unquantized)."""
    from lowbit.compress.api import compress
    from lowbit.compress.recipe import Recipe
    from tests.conftest import make_tiny_llama
    from tests.export.test_gguf_export import byte_tokenizer
    from tests.export.test_gguf_kquants import MIXED, WIDE

    tok = byte_tokenizer()
    out = tmp_path / "kq"
    compress(make_tiny_llama(len(tok), **WIDE), Recipe.from_dict(MIXED), out, tokenizer=tok, progress=False)
    export(out, tmp_path / "gguf", "gguf")
    assert_runs_like_lowbit(out, tmp_path / "gguf" / "model.gguf")


def held_out_perplexities(llm, model, tok, tokens: int = 2048) -> tuple[float, float]:
    """(lowbit's, llama.cpp's) perplexity on the first `tokens` held-out news tokens, windows of 512."""
    from lowbit.calibration.data import eval_tokens

    blocks = eval_tokens(tok, "builtin:lee-news", tokens).view(-1, 512)
    nll_lowbit, nll_cpp = 0.0, 0.0
    for row in blocks:
        with torch.no_grad():
            logp = torch.log_softmax(model(row[None]).logits[0, :-1].float(), -1)
        nll_lowbit -= float(logp.gather(1, row[1:, None]).sum())
        cpp = torch.log_softmax(torch.from_numpy(llama_cpp_logits(llm, row.tolist()))[:-1], -1)
        nll_cpp -= float(cpp.gather(1, row[1:, None]).sum())
    n = blocks.shape[0] * (blocks.shape[1] - 1)
    return math.exp(nll_lowbit / n), math.exp(nll_cpp / n)


@pytest.mark.slow
@needs_builtin
def test_builtin_q4_k_export_in_llama_cpp(tmp_path):
    """The q4_k preset on the built-in model (Q4_K where K = 1536, the down projections; Q4_1 elsewhere,
    llama-quantize's fallback), exported with its default Q8_0 embedding: llama.cpp's perplexity within 2%
    of lowbit's."""
    from lowbit.compress.api import compress

    compress("smollm2-135m", "q4_k", tmp_path / "q4k", progress=False)
    r = export(tmp_path / "q4k", tmp_path / "gguf", "gguf")
    assert r["converted"] == 0
    types = {r["layers"][n]["target"] for n in r["layers"]}
    assert any("q4_k" in t for t in types) and any("int4-g32" in t for t in types)
    llm = open_gguf(tmp_path / "gguf" / "model.gguf")
    ppl_lowbit, ppl_cpp = held_out_perplexities(llm, load(tmp_path / "q4k"), load_tokenizer(tmp_path / "q4k"))
    print(f"perplexity lowbit {ppl_lowbit:.4f}, llama.cpp {ppl_cpp:.4f}")
    assert ppl_cpp == pytest.approx(ppl_lowbit, rel=0.02)


@pytest.mark.slow
@needs_builtin
def test_builtin_int4_export_in_llama_cpp(tmp_path):
    """The README's int4-g128 checkpoint of the built-in model, exported to GGUF (g128 as 4 blocks,
    exact): llama.cpp's perplexity on held-out news within 2% of lowbit's, and llama.cpp's token ids of
    the built-in vocabulary equal lowbit's tokenizer's where whitespace precedes digits."""
    from lowbit.compress.api import compress

    compress("smollm2-135m", "int4-g128", tmp_path / "int4", progress=False)
    export(tmp_path / "int4", tmp_path / "gguf", "gguf")
    llm = open_gguf(tmp_path / "gguf" / "model.gguf")
    tok = load_tokenizer(tmp_path / "int4")
    for text in ("a 123 b  45", "Prices rose 3.5% to $1,234 in 2024."):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(
            text, add_special_tokens=False
        )
    ppl_lowbit, ppl_cpp = held_out_perplexities(llm, load(tmp_path / "int4"), tok)
    print(f"perplexity lowbit {ppl_lowbit:.4f}, llama.cpp {ppl_cpp:.4f}")
    assert ppl_cpp == pytest.approx(ppl_lowbit, rel=0.02)
