"""Sharded checkpoints: past the maximum shard size the tensors go to numbered shards plus an index, and
`lowbit.load`, `checkpoint_info`, the exports and transformers read them exactly as one file."""

import json

import pytest
import torch

from lowbit.compress.api import compress
from lowbit.export import export, load_export
from lowbit.nn.checkpoint import checkpoint_info, load, save
from lowbit.nn.hf_quantizer import register
from lowbit.nn.manifest import CheckpointError
from lowbit.nn.shards import INDEX, read_headers, shard_name, write_safetensors
from tests.conftest import NEWS, make_tiny_llama, make_tokenizer


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(one-file checkpoint, the same model saved in shards of at most 20 kB)."""
    root = tmp_path_factory.mktemp("shards")
    tok = make_tokenizer(NEWS)
    model, _ = compress(make_tiny_llama(len(tok)), "int4-g128", root / "one", tokenizer=tok, progress=False)
    save(model, root / "many", tokenizer=tok, max_shard_bytes=20_000)
    return root / "one", root / "many"


def test_shards_hold_the_same_tensors_and_load_identically(pair):
    one, many = pair
    index = json.loads((many / INDEX).read_text())
    n = len(set(index["weight_map"].values()))
    assert n > 2 and sorted(set(index["weight_map"].values())) == [shard_name(k, n) for k in range(1, n + 1)]
    assert not (many / "model.safetensors").exists()
    a, b = read_headers(one), read_headers(many)
    assert a.keys() == b.keys()
    for (fa, _), (fb, _) in ((a[k], b[k]) for k in a):
        assert fa.name == "model.safetensors" and fb.parent == many
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    sa, sb = load(one).state_dict(), load(many).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(load(one)(ids).logits, load(many)(ids).logits)
    ia, ib = checkpoint_info(one), checkpoint_info(many)
    assert ia["layers"] == ib["layers"]
    assert ia["totals"]["tensor_bytes"] == ib["totals"]["tensor_bytes"]


def test_transformers_and_exports_read_shards(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    one, many = pair
    register()
    ids = torch.randint(0, 250, (1, 9), generator=torch.Generator().manual_seed(2))
    hf = AutoModelForCausalLM.from_pretrained(many)
    assert torch.equal(hf(ids).logits, load(one)(ids).logits)
    export(many, tmp_path / "dense", "dense")
    dense, _, _ = load_export(tmp_path / "dense")
    assert torch.allclose(dense(ids).logits, load(one)(ids).logits, atol=1e-4)


def test_a_changed_shard_is_refused(pair, tmp_path):
    import shutil

    many = tmp_path / "many"
    shutil.copytree(pair[1], many)
    shard = sorted(many.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load(many)


def test_write_safetensors_refuses_a_tensor_unlike_its_layout(tmp_path):
    layout = {"a": (torch.float32, (2, 3))}
    with pytest.raises(CheckpointError, match="not"):
        write_safetensors(tmp_path / "x.safetensors", layout, lambda _: torch.zeros(3, 2))
    assert list(tmp_path.iterdir()) == []
