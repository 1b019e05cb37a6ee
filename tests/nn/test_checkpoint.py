"""Checkpoints: save -> load bit-identical, the manifest schema, every corruption a clear error."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lowbit.nn import checkpoint as ckpt
from lowbit.nn.atomic import OutputExistsError
from lowbit.nn.checkpoint import checkpoint_info, load, load_tokenizer, save
from lowbit.nn.manifest import CheckpointError, is_checkpoint, read_manifest, sha256, validate_manifest
from lowbit.nn.qlinear import QLinear, set_submodule
from lowbit.quantizers import QuantSpec, bits_per_weight, quantize
from tests.conftest import as_format_1

VOCAB = 96
# one layer per case: int4 asym g32, nf4 double-quant, int3 ragged group (K = 160, g64), fp8 per-channel,
# rank 4 + smoothing, and biases (attention_bias=True gives q/k/v/o biases)
LAYERS = {
    "model.layers.0.self_attn.q_proj": (QuantSpec("int4", 32), 0, False),
    "model.layers.0.self_attn.k_proj": (QuantSpec("nf4", 64, double_quant=True), 0, False),
    "model.layers.0.mlp.down_proj": (QuantSpec("int3", 64), 0, False),
    "model.layers.0.mlp.up_proj": (QuantSpec("fp8_e4m3", None), 0, False),
    "model.layers.1.self_attn.o_proj": (QuantSpec("int4", 32, symmetric=True), 4, True),
    "model.layers.1.mlp.gate_proj": (QuantSpec("fp4_e2m1", 32, scale_dtype="bfloat16"), 2, False),
}


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    for fqn, (spec, rank, smooth) in LAYERS.items():
        lin = model.get_submodule(fqn)
        N, K = lin.weight.shape
        l1 = 0.1 * torch.randn(N, rank, generator=g) if rank else None
        l2 = 0.1 * torch.randn(rank, K, generator=g) if rank else None
        s = 0.5 + torch.rand(K, generator=g) if smooth else None
        set_submodule(model, fqn, QLinear.from_linear(lin, quantize(lin.weight.detach(), spec), l1, l2, s))
    plan = {fqn: model.get_submodule(fqn).layer_plan() for fqn in LAYERS}
    return model, plan


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "the", "cat", "sat", "on", "mat"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, plan = tiny_model()
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    recipe = {"version": 1, "quantize": {"format": "int4"}}
    assert save(model, out, plan=plan, recipe=recipe, tokenizer=tiny_tokenizer()) == out
    return model, plan, out


@pytest.fixture
def copy_of(saved, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(saved[2], dst)
    return dst


def test_save_load_is_bit_identical(saved):
    model, plan, out = saved
    loaded = load(out)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for fqn in LAYERS:
        q = loaded.get_submodule(fqn)
        assert isinstance(q, QLinear) and q.layer_plan() == plan[fqn]
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert not loaded.training
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_files_and_manifest(saved):
    model, plan, out = saved
    assert is_checkpoint(out) and not is_checkpoint(out.parent)
    m = read_manifest(out)
    assert m["format_version"] == ckpt.FORMAT_VERSION == 2 and m["layers"] == plan
    assert m["recipe"] == {"version": 1, "quantize": {"format": "int4"}}
    on_disk = {p.name for p in out.iterdir()} - {ckpt.MANIFEST}
    assert set(m["files"]) == on_disk and {"model.safetensors", "config.json", "tokenizer.json"} <= on_disk
    for name, digest in m["files"].items():
        assert ckpt.sha256(out / name) == digest
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.codes").dtype == torch.uint8
    assert "lm_head.weight" not in keys  # tied to the embedding, re-tied on load
    for fqn, (spec, rank, smooth) in LAYERS.items():
        fields = set(quantize(torch.randn(8, 64), spec).tensors())
        fields |= {"bias"} if "self_attn" in fqn else set()
        fields |= {"l1", "l2"} if rank else set()
        fields |= {"smooth"} if smooth else set()
        assert {k[len(fqn) + 1 :] for k in keys if k.startswith(fqn + ".")} == fields
    assert not list(out.parent.glob(".tiny*"))


def test_tokenizer_round_trip(saved, copy_of):
    tok = load_tokenizer(saved[2])
    assert tok("the cat sat")["input_ids"] == tiny_tokenizer()("the cat sat")["input_ids"]
    for f in copy_of.glob("*token*"):
        f.unlink()
    assert load_tokenizer(copy_of) is None


def test_load_with_dtype_keeps_quantized_fields(saved):
    model, _, out = saved
    loaded = load(out, dtype=torch.bfloat16)
    q = loaded.get_submodule("model.layers.1.self_attn.o_proj")
    assert q.l1.dtype == q.bias.dtype == loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert q.scales.dtype == torch.float16 and q.codes.dtype == torch.uint8
    k = loaded.get_submodule("model.layers.0.self_attn.k_proj")
    assert k.dq_absmax.dtype == torch.float32
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits.float(), model(ids).logits, rtol=0.1, atol=0.1)


def test_checkpoint_info_counts_every_stored_byte(saved):
    model, plan, out = saved
    info = checkpoint_info(out)
    assert json.loads(json.dumps(info)) == info
    sd = model.state_dict()
    total = 0
    for fqn, x in info["layers"].items():
        stored = sum(
            t.numel() * t.element_size()
            for k, t in sd.items()
            if k.startswith(fqn + ".") and k != fqn + ".bias"
        )
        assert x["bytes"] == stored
        assert (
            x["codes_bytes"] + x["scales_bytes"] + x["zeros_bytes"] + x["lowrank_bytes"] + x["smooth_bytes"]
            == stored
        )
        spec, rank, smooth = LAYERS[fqn]
        assert x["spec"] == spec.short() and x["rank"] == rank and x["bits"] == spec.bits
        if not rank and not smooth:
            assert x["bits_per_weight"] == pytest.approx(bits_per_weight(spec, x["shape"]))
        total += stored
    t = info["totals"]
    params = sum(e["shape"][0] * e["shape"][1] for e in plan.values())
    assert t["params"] == params and t["quantized_bytes"] == total
    assert t["bits_per_weight"] == pytest.approx(8 * total / params)
    assert t["file_bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert t["tensor_bytes"] == sum(
        t.numel() * t.element_size() for k, t in sd.items() if k != "lm_head.weight"
    )


def test_truncated_weights(copy_of):
    f = copy_of / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        load(copy_of)
    f.write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        checkpoint_info(copy_of)


def test_missing_file(copy_of):
    (copy_of / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load(copy_of)


def test_hash_mismatch(copy_of):
    f = copy_of / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, one tensor byte changed
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load(copy_of)


def test_newer_format_version(copy_of):
    m = json.loads((copy_of / ckpt.MANIFEST).read_text())
    m["format_version"] = 3
    (copy_of / ckpt.MANIFEST).write_text(json.dumps(m))
    msg = "checkpoint format_version 3 is newer than this lowbit (supports 2); upgrade lowbit"
    with pytest.raises(CheckpointError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        load(copy_of)


def test_format_1_with_a_byte_per_zero_point_loads_and_saves_as_format_2(saved, tmp_path):
    model, plan, out = saved
    old = as_format_1(out, tmp_path / "v1")
    with safe_open(str(old / "model.safetensors"), "pt") as f:  # int4 g32 on K = 64: [N, 2] bytes
        assert f.get_slice("model.layers.0.self_attn.q_proj.zeros").get_shape() == [64, 2]
    loaded = load(old)
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    save(loaded, tmp_path / "v2")
    assert read_manifest(tmp_path / "v2")["format_version"] == 2
    with safe_open(str(tmp_path / "v2" / "model.safetensors"), "pt") as f:  # 128 4-bit zero points
        assert f.get_slice("model.layers.0.self_attn.q_proj.zeros").get_shape() == [64]


def test_format_1_zero_points_out_of_range_are_a_clear_error(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    old = as_format_1(saved[2], tmp_path / "v1")
    state = load_file(str(old / "model.safetensors"))
    state["model.layers.0.mlp.down_proj.zeros"][0, 0] = 9  # int3: at most 7
    save_file(state, str(old / "model.safetensors"), metadata={"format": "pt"})
    m = json.loads((old / ckpt.MANIFEST).read_text())
    m["files"]["model.safetensors"] = sha256(old / "model.safetensors")
    (old / ckpt.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="down_proj.zeros: codes must be < 2\\^3"):
        load(old)


def test_not_a_checkpoint_and_bad_json(tmp_path, copy_of):
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        load(tmp_path)
    (copy_of / ckpt.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(copy_of)


def test_unknown_backend(saved):
    with pytest.raises(ValueError, match="unknown qlinear backend"):
        load(saved[2], backend="warp")


def test_existing_out_dir_needs_overwrite(tmp_path):
    model, plan = tiny_model()
    out = tmp_path / "ck"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="exists; pass --overwrite"):
        save(model, out, plan=plan)
    with pytest.raises(OutputExistsError, match="not a lowbit checkpoint, export or work area"):
        save(model, out, plan=plan, overwrite=True)  # a folder lowbit did not write is never replaced
    assert (out / "old.txt").exists()
    (out / "old.txt").unlink()
    save(model, out, plan=plan, overwrite=True)  # an empty folder may be
    save(model, out, plan=plan, overwrite=True)  # and so may a checkpoint
    assert is_checkpoint(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failing_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model, plan = tiny_model()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        save(model, tmp_path / "ck", plan=plan)
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    save(model, tmp_path / "ck", plan=plan)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    monkeypatch.setattr(ckpt, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        save(model, tmp_path / "ck", plan=plan, overwrite=True)
    assert leftovers(tmp_path) == ["ck"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before


def test_save_checks_the_plan_against_the_model(tmp_path):
    model, plan = tiny_model()
    wrong = dict(plan)
    wrong.pop("model.layers.0.mlp.up_proj")
    with pytest.raises(CheckpointError, match="missing from the plan"):
        save(model, tmp_path / "a", plan=wrong)
    with pytest.raises(CheckpointError, match="not a QLinear"):
        save(
            model,
            tmp_path / "b",
            plan={**plan, "model.layers.0.mlp.nope": plan["model.layers.0.mlp.up_proj"]},
        )
    changed = {**plan, "model.layers.0.mlp.up_proj": {**plan["model.layers.0.mlp.up_proj"], "rank": 3}}
    with pytest.raises(CheckpointError, match="does not match"):
        save(model, tmp_path / "c", plan=changed)
    assert leftovers(tmp_path) == []


def good_manifest() -> dict:
    entry = {
        "spec": QuantSpec("int4", 128).to_dict(),
        "shape": [8, 16],
        "rank": 0,
        "bias": False,
        "smooth": False,
    }
    files = {"model.safetensors": "a" * 64, "config.json": "b" * 64}
    return {
        "format_version": 1,
        "lowbit_version": "0.1.0",
        "recipe": None,
        "layers": {"l": entry},
        "files": files,
    }


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: m.pop("files"), "missing"),
        (lambda m: m.update(extra=1), "unknown"),
        (lambda m: m.update(format_version="1"), "format_version"),
        (lambda m: m.update(format_version=0), "format_version"),
        (lambda m: m.update(recipe=[1]), "recipe"),
        (lambda m: m["layers"]["l"].pop("rank"), "keys"),
        (lambda m: m["layers"]["l"].update(rank=-1), "rank"),
        (lambda m: m["layers"]["l"].update(shape=[8]), "shape"),
        (lambda m: m["layers"]["l"].update(bias=1), "bias"),
        (lambda m: m["layers"]["l"]["spec"].update(format="int5"), "bad spec"),
        (lambda m: m["files"].update({"../evil": "c" * 64}), "bad file name"),
        (lambda m: m["files"].update({"config.json": "XYZ"}), "sha256"),
        (lambda m: m["files"].pop("config.json"), "config.json"),
    ],
)
def test_validate_manifest_rejects(change, match):
    assert validate_manifest(good_manifest()) == good_manifest()
    m = good_manifest()
    change(m)
    with pytest.raises(CheckpointError, match=match) as e:
        validate_manifest(m)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
