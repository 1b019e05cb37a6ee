"""Local safetensors folders read tensor by tensor equal what transformers' from_pretrained loads."""

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lowbit.models import load_model, source
from lowbit.models.folder import load_safetensors_folder
from tests.conftest import NEWS, make_tiny_llama, make_tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tok = make_tokenizer(NEWS)
    made = {}
    for name, dtype, kw in [
        ("fp32", torch.float32, {}),
        ("bf16-sharded", torch.bfloat16, {"max_shard_size": "40KB"}),
        ("untied", torch.float32, {}),
    ]:
        path = tmp_path_factory.mktemp(name)
        model = make_tiny_llama(len(tok), tie_word_embeddings=name != "untied").to(dtype)
        model.save_pretrained(path, **kw)
        tok.save_pretrained(path)
        made[name] = path
    return made


@pytest.mark.parametrize("name", ["fp32", "bf16-sharded", "untied"])
@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_read_equals_from_pretrained(folders, monkeypatch, name, dtype):
    path = folders[name]
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").eval()
    monkeypatch.setattr(source, "from_pretrained", lambda *a: pytest.fail("fell back to from_pretrained"))
    model, _ = load_model(str(path), dtype=dtype)
    a, b = model.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for (ka, x), (kb, y) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        assert ka == kb and x.dtype == y.dtype and torch.equal(x, y), ka
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert tied == (name != "untied")
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_renamed_tensors_fall_back(folders, tmp_path):
    path = folders["fp32"]
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    state = load_file(str(path / "model.safetensors"))
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert load_safetensors_folder(tmp_path, config, torch.float32) is None
