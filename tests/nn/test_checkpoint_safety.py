"""Bad checkpoints are refused at load with one line, before anything large is built: non-finite values,
config sizes that do not match the stored tensors, oversized or deeply nested JSON, symbolic links and
unlisted or altered tokenizer files."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.nn.checkpoint import load, load_tokenizer, save
from lowbit.nn.manifest import MANIFEST, CheckpointError, read_manifest, sha256
from tests.nn.test_checkpoint import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, plan = tiny_model()
    out = tmp_path_factory.mktemp("safety") / "tiny"
    save(model, out, plan=plan, tokenizer=tiny_tokenizer())
    return out


@pytest.fixture
def bad(saved, tmp_path):
    dst = tmp_path / "bad"
    shutil.copytree(saved, dst)
    return dst


def rehash(folder, name):
    """Record the new sha256 of `name` in the manifest, as a forger would."""
    m = json.loads((folder / MANIFEST).read_text())
    m["files"][name] = sha256(folder / name)
    (folder / MANIFEST).write_text(json.dumps(m))


def set_tensor(folder, key, change):
    state = load_file(str(folder / "model.safetensors"))
    change(state[key])
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    rehash(folder, "model.safetensors")


def set_config(folder, **values):
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config))
    rehash(folder, "config.json")


@pytest.mark.parametrize(
    "key",
    [
        "model.layers.0.self_attn.q_proj.scales",
        "model.layers.0.self_attn.k_proj.dq_absmax",
        "model.layers.1.self_attn.o_proj.l1",
        "model.layers.1.self_attn.o_proj.smooth",
    ],
)
def test_non_finite_values_are_refused(bad, key):
    set_tensor(bad, key, lambda t: t.view(-1)[0].fill_(float("nan")))
    with pytest.raises(CheckpointError, match=f"tensor {key} holds NaN or infinite values"):
        load(bad)


def test_infinite_low_rank_factor_is_refused(bad):
    set_tensor(bad, "model.layers.1.mlp.gate_proj.l2", lambda t: t.view(-1)[3].fill_(float("inf")))
    with pytest.raises(CheckpointError, match="gate_proj.l2 holds NaN"):
        load(bad)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"vocab_size": 10**10}, "vocab_size 10000000000 matches no stored tensor"),
        ({"hidden_size": 4096}, "hidden_size 4096 matches no stored tensor"),
        ({"num_hidden_layers": 20000}, "num_hidden_layers 20000 does not match the 2 stored layers"),
        ({"num_hidden_layers": 1}, "num_hidden_layers 1 does not match"),
    ],
)
def test_config_sizes_are_checked_against_the_stored_tensors_before_building(bad, values, match):
    set_config(bad, **values)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=match):
        load(bad)
    assert time.perf_counter() - t0 < 10  # refused before the model is built


def test_deeply_nested_or_huge_manifest_is_refused_without_recursion(bad, monkeypatch):
    (bad / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested deeper than 32 levels"):
        read_manifest(bad)
    from lowbit.nn import manifest

    monkeypatch.setattr(manifest, "MAX_JSON_BYTES", 1000)
    (bad / MANIFEST).write_text(json.dumps({"pad": "x" * 2000}))
    with pytest.raises(CheckpointError, match="larger than"):
        read_manifest(bad)


def test_deeply_nested_config_is_refused(bad):
    (bad / "config.json").write_text('{"a": ' + "[" * 5000 + "]" * 5000 + "}")
    rehash(bad, "config.json")
    with pytest.raises(CheckpointError, match="config.json .* nested deeper"):
        load(bad)


def test_symbolic_links_are_refused(bad, saved, tmp_path):
    target = tmp_path / "elsewhere.json"
    shutil.move(bad / "tokenizer.json", target)
    (bad / "tokenizer.json").symlink_to(target)
    with pytest.raises(CheckpointError, match="tokenizer.json is a symbolic link"):
        load(bad)
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_tokenizer(bad)
    link = tmp_path / "link"
    link.symlink_to(saved)
    with pytest.raises(CheckpointError, match="is a symbolic link; give the real folder"):
        load(link)


def test_unlisted_tokenizer_files_are_refused(bad):
    (bad / "special_tokens_map.json").write_text(json.dumps({"eos_token": "cat"}))
    with pytest.raises(CheckpointError, match="special_tokens_map.json is not listed in lowbit_config.json"):
        load_tokenizer(bad)
    with pytest.raises(CheckpointError, match="not listed"):
        load(bad)


def test_altered_tokenizer_file_is_refused(bad):
    config = json.loads((bad / "tokenizer_config.json").read_text())
    config["eos_token"] = "mat"
    (bad / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="tokenizer_config.json is corrupt"):
        load_tokenizer(bad)


def test_eval_of_a_nan_checkpoint_exits_non_zero_with_one_line(bad):
    set_tensor(bad, "model.layers.0.self_attn.q_proj.scales", lambda t: t.view(-1)[0].fill_(float("nan")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("LOWBIT_DEBUG", None)
    r = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "eval", str(bad), "--data", "builtin:lee-news", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds NaN or infinite values" in lines[0], r.stderr


def test_model_card_is_written_and_listed(saved):
    card = (saved / "README.md").read_text()
    assert "bits per weight" in card and "lowbit.load" in card and "import lowbit" in card
    assert read_manifest(saved)["files"]["README.md"] == sha256(saved / "README.md")
    assert torch.equal(load(saved).model.embed_tokens.weight, tiny_model()[0].model.embed_tokens.weight)


def test_a_hub_cache_snapshot_linking_to_its_blobs_loads(saved, tmp_path):
    snapshot = tmp_path / "models--me--tiny" / "snapshots" / "abc123"
    blobs = tmp_path / "models--me--tiny" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in saved.iterdir():
        shutil.copy(f, blobs / sha256(f))
        (snapshot / f.name).symlink_to(f"../../blobs/{sha256(f)}")
    ids = torch.arange(1, 6)[None]
    with torch.no_grad():
        assert torch.equal(load(snapshot)(ids).logits, load(saved)(ids).logits)


def test_every_floating_tensor_of_a_quantized_layer_must_be_finite():
    from lowbit.nn.manifest import check_finite

    nan = torch.tensor([1.0, float("nan")])
    layers = {"model.layers.0.mlp.up_proj"}
    # a format family's own per-group tensor is checked like the scales; the bias and others are not
    with pytest.raises(CheckpointError, match="up_proj.codebook holds NaN"):
        check_finite([("model.layers.0.mlp.up_proj.codebook", nan)], layers)
    check_finite([("model.layers.0.mlp.up_proj.bias", nan), ("model.norm.weight", nan)], layers)
    check_finite([("model.layers.0.mlp.up_proj.codes", torch.tensor([3], dtype=torch.uint8))], layers)
