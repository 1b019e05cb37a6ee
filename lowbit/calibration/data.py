"""Text sources and token blocks: calibration windows and held-out evaluation tokens.

Sources (`load_text(source)`):

- ``builtin:lee-news``: the Lee news corpus (300 Australian news articles, one per line) shipped inside the
  gensim wheel as ``gensim/test/test_data/lee_background.cor``; only the file is used, gensim is never
  imported (``pip install --no-deps gensim`` provides it).
- local files: ``.txt`` (documents separated by one or more blank lines; a file without any blank line is
  read as one document per line), ``.jsonl`` (one JSON object per line, field ``text``), ``.parquet``
  (column ``text``).
- hub datasets: ``wikitext2`` (``wikitext``, ``wikitext-2-raw-v1``), ``c4`` (the first ``allenai/c4``
  train and validation shards) and any other ``name[:config]`` loaded with ``datasets.load_dataset``.
  Hub rows are kept verbatim (empty rows included), so ``wikitext2``'s evaluation text is the usual
  ``"\\n\\n".join(test["text"])``.

Calibration and evaluation never overlap; the split is deterministic and made at document level:

- sources with their own splits use ``train`` for calibration and ``test`` (else ``validation``) for
  evaluation;
- single-split sources (lee-news, local files, and hub datasets lacking a train or a test/validation split,
  whose train or first split is used) keep the first 80% of documents for calibration and the last 20%
  (by count, at least one) for evaluation.

A part's documents are joined with ``"\\n\\n"`` and tokenized as one text, without special tokens.
"""

from __future__ import annotations

import bisect
import importlib.metadata
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

PARTS = ("calib", "eval")
EVAL_FRACTION = 0.2
SEPARATOR = "\n\n"
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Names ending like a data file are local paths (and get a clear error), never hub dataset names.
FILE_LIKE_SUFFIXES = FILE_SUFFIXES + (".json", ".csv", ".tsv", ".gz", ".arrow", ".md")
# Windows are drawn from at most this many calibration tokens (or samples * seq_len if larger), so a
# large shard (c4: ~350k documents) is not tokenized whole to draw a few hundred windows.
CALIB_POOL_TOKENS = 1 << 22


class DataError(ValueError):
    """A text source that cannot be used: unknown, unreachable, malformed or too short."""


@dataclass(frozen=True)
class BuiltinText:
    """A corpus shipped as a data file inside an installed distribution (never imported)."""

    distribution: str
    path_suffix: str
    description: str


@dataclass(frozen=True)
class HubText:
    """A hub dataset: `load_dataset(path, name, data_files=...)` with named calibration/evaluation splits."""

    path: str
    name: str | None = None
    data_files: dict[str, str] | None = None


BUILTIN_TEXTS = {
    "lee-news": BuiltinText("gensim", "test/test_data/lee_background.cor", "Lee news corpus, 300 articles"),
}
HUB_TEXTS = {
    "wikitext2": HubText("wikitext", "wikitext-2-raw-v1"),
    "c4": HubText(
        "allenai/c4",
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
    ),
}


def load_text(source: str) -> list[str]:
    """All documents of `source` (for sources with splits: the calibration split, then the evaluation one)."""
    parts = _read_source(source)
    return parts["all"] if "all" in parts else parts["calib"] + parts["eval"]


def texts(source: str, part: str) -> list[str]:
    """The documents of one part ("calib" or "eval") of `source`; the two parts never share a document."""
    _check_part(part)
    parts = _read_source(source)
    return split_documents(parts["all"], part) if "all" in parts else parts[part]


def split_documents(docs: list[str], part: str) -> list[str]:
    """Deterministic split of a single-split source: first 80% of documents "calib", last 20% "eval"."""
    _check_part(part)
    n = len(docs)
    if n < 2:
        raise DataError(
            f"a source needs at least 2 documents to split into calibration and evaluation, got {n}"
        )
    n_eval = max(1, int(n * EVAL_FRACTION))
    return list(docs[: n - n_eval]) if part == "calib" else list(docs[n - n_eval :])


def calibration_blocks(tokenizer, source: str, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`samples` random windows of `seq_len` tokens from the calibration part of `source`.

    Windows do not overlap while `samples * seq_len` fits in the text (distinct slots of a grid at a random
    offset); beyond that they are drawn independently and may overlap. Deterministic for a given `seed`.
    Returns LongTensor [samples, seq_len].
    """
    if samples < 1 or seq_len < 1:
        raise DataError(f"samples and seq_len must be positive, got samples={samples}, seq_len={seq_len}")
    ids = tokenize(tokenizer, texts(source, "calib"), max_tokens=max(CALIB_POOL_TOKENS, samples * seq_len))
    T = ids.numel()
    if T < seq_len:
        raise DataError(f"calibration text of {source!r} has {T} tokens, fewer than one window of {seq_len}")
    g = torch.Generator().manual_seed(seed)
    n_slots = T // seq_len
    if samples <= n_slots:
        offset = int(torch.randint(0, T - n_slots * seq_len + 1, (1,), generator=g))
        starts = offset + torch.randperm(n_slots, generator=g)[:samples] * seq_len
    else:
        starts = torch.randint(0, T - seq_len + 1, (samples,), generator=g)
    # starts: [samples] -> index: [samples, seq_len]
    return ids[starts[:, None] + torch.arange(seq_len)]


def eval_tokens(tokenizer, source: str, max_tokens: int | None = None) -> torch.Tensor:
    """The evaluation part of `source` tokenized, truncated to `max_tokens`. Returns LongTensor [T]."""
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens must be positive, got {max_tokens}")
    ids = tokenize(tokenizer, texts(source, "eval"), max_tokens=max_tokens)
    if ids.numel() == 0:
        raise DataError(f"evaluation text of {source!r} is empty")
    return ids


def tokenize(tokenizer, docs: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Documents joined with SEPARATOR, tokenized as one text; LongTensor [T].

    With `max_tokens`, only a prefix of documents long enough to give `max_tokens` tokens is tokenized
    (4 characters per token first, doubled until enough), and the result is cut to `max_tokens`.
    """
    if max_tokens is None:
        return _encode(tokenizer, SEPARATOR.join(docs))
    ends = list(itertools.accumulate(len(d) + len(SEPARATOR) for d in docs))
    n_chars = 4 * max_tokens
    while True:
        k = min(len(docs), bisect.bisect_left(ends, n_chars) + 1)
        ids = _encode(tokenizer, SEPARATOR.join(docs[:k]))
        if ids.numel() >= max_tokens or k == len(docs):
            return ids[:max_tokens]
        n_chars *= 2


def _encode(tokenizer, text: str) -> torch.Tensor:
    # verbose=False: a whole corpus is longer than the model's context; it is cut into windows later.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long).reshape(-1)


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise DataError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")


def _read_source(source: str) -> dict[str, list[str]]:
    """{"all": docs} for a single-split source, {"calib": docs, "eval": docs} for one with its own splits."""
    if source.startswith("builtin:"):
        return {"all": _read_builtin(source.removeprefix("builtin:"))}
    path = Path(source).expanduser()
    if path.suffix in FILE_LIKE_SUFFIXES or path.exists() or source.startswith((".", "/", "~")):
        return {"all": _read_file(path, source)}
    return _read_hub(source)


def _read_builtin(name: str) -> list[str]:
    if name not in BUILTIN_TEXTS:
        raise DataError(f"unknown built-in text 'builtin:{name}'; choose one of {_builtin_names()}")
    spec = BUILTIN_TEXTS[name]
    dist = spec.distribution
    hint = f"builtin:{name} is read from the {dist} wheel: pip install --no-deps {dist}"
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise DataError(hint) from None
    found = [f.locate() for f in files if str(f).replace("\\", "/").endswith(spec.path_suffix)]
    found = [Path(p) for p in found if Path(p).is_file()]
    if not found:
        raise DataError(f"{spec.path_suffix} is missing from the installed {dist}; {hint}")
    return _lines(found[0].read_text(encoding="utf-8", errors="replace"))


def _builtin_names() -> str:
    return ", ".join(f"builtin:{n}" for n in BUILTIN_TEXTS)


def _read_file(path: Path, source: str) -> list[str]:
    if not path.exists():
        raise DataError(f"text file {source!r} does not exist")
    if not path.is_file():
        raise DataError(f"text source {source!r} is a folder; give a {', '.join(FILE_SUFFIXES)} file")
    if path.suffix not in FILE_SUFFIXES:
        raise DataError(f"unsupported text file {source!r}; use one of {', '.join(FILE_SUFFIXES)}")
    reader = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[path.suffix]
    docs = [d for d in reader(path, source) if d.strip()]
    if not docs:
        raise DataError(f"text file {source!r} has no documents")
    return docs


def _read_txt(path: Path, source: str) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    if re.search(r"\n[ \t]*\n", text.strip()):
        return [d.strip() for d in re.split(r"\n[ \t]*\n", text)]
    return _lines(text)


def _read_jsonl(path: Path, source: str) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{source!r} line {i} is not JSON: {e.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{source!r} line {i} has no string field 'text'")
            docs.append(row["text"])
    return docs


def _read_parquet(path: Path, source: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as e:
        raise DataError(f"{source!r} is not a readable parquet file: {_first_line(e)}") from None
    if "text" not in names:
        raise DataError(f"{source!r} has no column 'text' (columns: {', '.join(names)})")
    return [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t is not None]


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_hub(source: str) -> dict[str, list[str]]:
    """Load a hub dataset; the split it offers decides between its own splits and the 80/20 document split."""
    import datasets

    spec = HUB_TEXTS.get(source) or HubText(*source.split(":", 1))
    try:
        ds = datasets.load_dataset(spec.path, spec.name, data_files=spec.data_files)
    except Exception as e:
        raise DataError(f"cannot load text source {source!r}: {_first_line(e)}") from None
    splits = dict(ds.items()) if hasattr(ds, "items") else {"train": ds}
    if not splits:
        raise DataError(f"dataset {source!r} has no splits")
    eval_name = next((s for s in ("test", "validation") if s in splits), None)
    if "train" in splits and eval_name is not None:
        return {"calib": _column(splits["train"], source), "eval": _column(splits[eval_name], source)}
    return {"all": _column(splits.get("train", next(iter(splits.values()))), source)}


def _column(split, source: str) -> list[str]:
    if "text" not in split.column_names:
        raise DataError(f"dataset {source!r} has no column 'text' (columns: {', '.join(split.column_names)})")
    return list(split["text"])


def _first_line(e: Exception) -> str:
    msg = str(e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__
