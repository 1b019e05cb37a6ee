"""The tokenizer of a GGUF export, as llama.cpp's `tokenizer.*` metadata keys.

llama.cpp tokenizes with these keys, and transformers builds a tokenizer from them (that is how
`from_pretrained(folder, gguf_file=...)` gets one). Two sources:

- The checkpoint came from a built-in model (`lowbit.models.BUILTIN_MODELS`, itself a GGUF file):
  its tokenizer is the one transformers built from that file, the same tokens in the same order. Every
  `tokenizer.*` key of the built-in file is copied as it is, so llama.cpp keeps the file's own
  pre-tokenizer (SmolLM2's "smollm", which transformers reads as plain GPT-2).
- Any other byte-level BPE tokenizer (`tokenizer.json`: a BPE model without byte fallback, no normalizer):
  the keys are written from it as llama.cpp's convert_hf_to_gguf.py does for BPE vocabularies: model
  "gpt2", the tokens by id (padded with `[PAD{i}]`, type UNUSED, up to the model's vocab size), token
  types (special added tokens CONTROL, other added tokens USER_DEFINED, the rest NORMAL), the merges, the
  special token ids, whether the tokenizer adds BOS / EOS, the chat template, and `pre`, llama.cpp's name
  for its pre-tokenizer (PRE_TOKENIZERS: GPT-2's regex, Llama 3's split, or SmolLM2's digits then GPT-2).
  `check_tokenizer` then builds the tokenizer back from the written file as lowbit reads GGUF tokenizers
  (`lowbit.models.gguf.gguf_tokenizer`) and compares encodings of a probe text.

Anything else (SentencePiece, Unigram, WordPiece, byte fallback, other pre-tokenizers) is refused in one line.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import gguf
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.integrations.gguf.reader import read_gguf_metadata

from lowbit.export.target import ExportError
from lowbit.models import BUILTIN_MODELS, ModelError, builtin_path
from lowbit.models.gguf import gguf_tokenizer

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# signature of a tokenizer.json pre_tokenizer (see _signature) -> llama.cpp's tokenizer.ggml.pre
PRE_TOKENIZERS = {
    ("ByteLevel", False, True): "gpt-2",
    (("Digits", True), ("ByteLevel", False, True)): "smollm",  # SmolLM2's tokenizer.json
    (("Split", LLAMA3_SPLIT, "Isolated", False), ("ByteLevel", False, False)): "llama-bpe",
}
PROBE = "Hello world! It's 2024; isn't it?\n\n  Prices rose 3.5% to $1,234.\tCafé naïve, 東京 🙂 <tag>"
T = gguf.TokenType


def _signature(pre: dict | None) -> tuple | None:
    """What of a pre-tokenizer decides how text is split: type and the flags / regex that matter."""
    if pre is None:
        return None
    if pre["type"] == "Sequence":
        return tuple(_signature(p) for p in pre["pretokenizers"])
    if pre["type"] == "Digits":
        return ("Digits", pre.get("individual_digits", False))
    if pre["type"] == "ByteLevel":
        return ("ByteLevel", pre.get("add_prefix_space", True), pre.get("use_regex", True))
    if pre["type"] == "Split":
        pattern = pre["pattern"].get("Regex", pre["pattern"].get("String"))
        return ("Split", pattern, pre.get("behavior"), pre.get("invert", False))
    return (pre["type"],)


@functools.lru_cache(maxsize=4)
def _gguf_tokens(path: str) -> tuple[str, ...]:
    metadata, _ = read_gguf_metadata(path, ("tokenizer.ggml.tokens",))
    return tuple(metadata.get("tokenizer.ggml.tokens", ()))


def _builtin_source(tokens: list[str]) -> Path | None:
    """The installed built-in GGUF file whose token list is exactly `tokens`, if any."""
    for name in BUILTIN_MODELS:
        try:
            path = builtin_path(name)
        except ModelError:
            continue
        if _gguf_tokens(str(path)) == tuple(tokens):
            return path
    return None


def _tokens(tokenizer) -> list[str]:
    """The vocabulary by id, added tokens included."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise ExportError("the tokenizer's token ids are not 0..n-1; it cannot be written to GGUF")
    return [by_id[i] for i in range(len(by_id))]


def _copy_fields(w: gguf.GGUFWriter, path: Path) -> None:
    for key, field in gguf.GGUFReader(path).fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub)


def _bpe_spec(tokenizer) -> tuple[dict, str]:
    """(tokenizer.json as a dict, llama.cpp pre-tokenizer name) of a byte-level BPE tokenizer, or refuse."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizer.json) tokenizer; this one has none")
    spec = json.loads(backend.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer")
    name = PRE_TOKENIZERS.get(_signature(pre))
    if model["type"] != "BPE" or model.get("byte_fallback") or spec.get("normalizer") or name is None:
        what = f"a {model['type']} model" + (" with byte fallback" if model.get("byte_fallback") else "")
        what += f", normalizer {spec['normalizer']['type']}" if spec.get("normalizer") else ""
        what += f", pre-tokenizer {json.dumps(pre)[:160]}"
        raise ExportError(
            f"cannot write this tokenizer to GGUF ({what}); supported: byte-level BPE with the GPT-2 or "
            "Llama 3 pre-tokenizer"
        )
    return spec, name


def _write_bpe(w: gguf.GGUFWriter, tokenizer, tokens: list[str], vocab_size: int) -> None:
    spec, pre = _bpe_spec(tokenizer)
    missing = set(bytes_to_unicode().values()) - set(tokens)
    if missing:  # the checkpoint's tokenizer maps such bytes to <unk>; llama.cpp has no way to
        raise ExportError(
            f"the byte-level vocabulary lacks {len(missing)} of the 256 byte symbols; llama.cpp cannot "
            "tokenize like it (it would need every byte as a token)"
        )
    added = {i: t.special for i, t in tokenizer.added_tokens_decoder.items()}
    kinds = {True: T.CONTROL, False: T.USER_DEFINED}
    types = [kinds[added[i]] if i in added else T.NORMAL for i in range(len(tokens))]
    pad = vocab_size - len(tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens + [f"[PAD{i}]" for i in range(len(tokens), vocab_size)])
    w.add_token_types(types + [T.UNUSED] * pad)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(w, f"add_{kind}_token_id")(token_id)
    ids = tokenizer("a")["input_ids"]
    w.add_add_bos_token(tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    w.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        w.add_chat_template(tokenizer.chat_template)


def add_tokenizer(w: gguf.GGUFWriter, tokenizer, vocab_size: int) -> bool:
    """Add the `tokenizer.*` keys of `tokenizer` to `w`; True when copied from a built-in GGUF file."""
    if tokenizer is None:
        raise ExportError("the checkpoint has no tokenizer; a GGUF file must carry one")
    tokens = _tokens(tokenizer)
    if len(tokens) > vocab_size:
        raise ExportError(f"the tokenizer has {len(tokens)} tokens, more than the model's {vocab_size}")
    source = _builtin_source(tokens)
    if source is not None:
        _copy_fields(w, source)
        return True
    _write_bpe(w, tokenizer, tokens, vocab_size)
    return False


def check_tokenizer(folder: Path, file: str, tokenizer) -> None:
    """Refuse when transformers, reading `folder / file`, does not tokenize PROBE as `tokenizer` does."""
    try:  # as lowbit reads a GGUF tokenizer: llama.cpp's digit split kept (lowbit.models.gguf)
        rebuilt = gguf_tokenizer(str(folder / file))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"transformers cannot read the tokenizer written to GGUF: {first}") from None
    want, got = tokenizer(PROBE)["input_ids"], rebuilt(PROBE)["input_ids"]
    if want != got:
        raise ExportError(
            f"the tokenizer written to GGUF encodes a probe text differently from the checkpoint's "
            f"({len(got)} vs {len(want)} tokens); this tokenizer cannot be expressed in GGUF"
        )
