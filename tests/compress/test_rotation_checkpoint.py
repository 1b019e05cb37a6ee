"""Compressing with the recipe's rotations: the checkpoint keeps the online transform (manifest plan and
recipe), reloads bit-identically, stays close to the float model, and the exports either fold the
transform back exactly (dense) or refuse it in one line naming the layer (compressed-tensors, GGUF)."""

import json
from types import SimpleNamespace

import pytest
import torch

from lowbit.compress import api
from lowbit.compress.recipe import Recipe
from lowbit.compress.uniform import CompressError, quantize_model
from lowbit.export import ExportError, export
from lowbit.models import load_model
from lowbit.nn.checkpoint import load
from lowbit.nn.manifest import CheckpointError, check_layer_entry
from tests.compress.test_smoothing import with_outlier_norms
from tests.compress.test_stream import assert_same
from tests.conftest import NEWS, logits, make_tiny_llama, make_tokenizer

ALL_FLAGS = {"heads": True, "online_down": True}
ALL = {"method": "hadamard", **ALL_FLAGS}
IDS = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(NEWS)


@pytest.fixture(scope="module")
def rotated(tmp_path_factory, tok):
    """{rounding: (checkpoint folder, compressed model, float model)} for int8-g32 with every rotation."""
    root, out = tmp_path_factory.mktemp("rotated"), {}
    for rounding in ("nearest", "gptq"):
        recipe = Recipe.from_dict(
            {"quantize": {"format": "int8", "group_size": 32, "rounding": rounding}, "rotate": ALL}
        )
        base = with_outlier_norms(make_tiny_llama(len(tok)))
        ref = logits(base, IDS)
        model, _ = api.compress(
            base, recipe, root / rounding, tokenizer=tok, calib_data=CALIB, progress=False
        )
        out[rounding] = (root / rounding, model, ref)
    return out


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_rotated_checkpoint_keeps_the_transform_and_reloads_bit_identically(rotated, rounding):
    folder, model, ref = rotated[rounding]
    manifest = json.loads((folder / "lowbit_config.json").read_text())
    flagged = sorted(n for n, e in manifest["layers"].items() if e.get("hadamard"))
    assert flagged == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert all("hadamard" not in e for n, e in manifest["layers"].items() if n not in flagged)
    assert manifest["recipe"]["rotate"] == {"method": "hadamard", "seed": 0, "residual": True, **ALL_FLAGS}
    loaded = load(folder)
    assert loaded.model.layers[1].mlp.down_proj.hadamard
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    assert float((logits(model, IDS) - ref).abs().max()) <= 0.05 * float(ref.abs().max())


def test_dense_export_folds_the_transform_back(rotated, tmp_path):
    folder, model, _ = rotated["nearest"]
    export(folder, tmp_path / "dense", "dense", dtype="float32")
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    want = logits(model, IDS)
    assert float((logits(dense, IDS) - want).abs().max()) <= 1e-4 * float(want.abs().max())


@pytest.mark.parametrize("target", ["compressed-tensors", "gguf"])
def test_other_exports_refuse_the_online_transform_naming_the_layer(rotated, tmp_path, target):
    pytest.importorskip("compressed_tensors" if target == "compressed-tensors" else "gguf")
    folder, _, _ = rotated["nearest"]
    for convert in (False, True):
        with pytest.raises(
            ExportError, match=r"online Hadamard transform of layer model\.layers\.0\.mlp\.down_proj"
        ):
            export(folder, tmp_path / f"{target}-{convert}", target, convert=convert)


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_streamed_source_folds_the_rotations_per_block_with_the_same_result(
    tiny_llama_dir, tmp_path, rounding
):
    """A tied fp32 folder: each block rotated as it is read, the lm_head untied when the outside part is;
    the checkpoint equals the in-memory run's tensor for tensor and reloads to the same logits."""
    recipe = Recipe.from_dict(
        {"quantize": {"format": "int4", "group_size": 32, "rounding": rounding}, "rotate": ALL}
    )
    data = CALIB if rounding == "gptq" else None
    streamed, _ = api.compress(str(tiny_llama_dir), recipe, tmp_path / "s", data=data, progress=False)
    assert all(t.device.type == "meta" for t in streamed.state_dict().values())  # the skeleton
    model, tok = load_model(str(tiny_llama_dir))
    kept, _ = api.compress(model, recipe, tmp_path / "m", tokenizer=tok, data=data, progress=False)
    assert_same(tmp_path / "s", tmp_path / "m")
    assert not json.loads((tmp_path / "s" / "config.json").read_text())["tie_word_embeddings"]
    assert torch.equal(logits(load(tmp_path / "s"), IDS), logits(kept, IDS))
    with pytest.raises(CompressError, match="streamed source"):
        quantize_model(make_tiny_llama(250), recipe, stream=SimpleNamespace(provider=object()))


def test_manifest_entry_hadamard_must_be_a_boolean():
    entry = {
        "spec": {"format": "int4", "group_size": 32},
        "shape": [8, 32],
        "rank": 0,
        "bias": False,
        "smooth": False,
    }
    check_layer_entry("a", {**entry, "hadamard": True})
    with pytest.raises(CheckpointError, match="hadamard must be true or false"):
        check_layer_entry("a", {**entry, "hadamard": 1})
    with pytest.raises(CheckpointError, match="keys"):
        check_layer_entry("a", {**entry, "rotation": True})


def test_dry_run_predicts_the_rotated_checkpoint(tiny_llama_dir, tmp_path):
    from lowbit.compress import dry_run

    recipe = Recipe.from_dict({"quantize": {"format": "int4", "group_size": 32}, "rotate": ALL})
    plan, plain = dry_run(str(tiny_llama_dir), recipe), dry_run(str(tiny_llama_dir), "int4-g128")
    assert plan.streamed and plain.streamed  # rotations are folded into each block as it is read
    api.compress(str(tiny_llama_dir), recipe, tmp_path / "out", progress=False)
    real = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert abs(plan.output_bytes[0] - real) / real < 0.03  # the untied lm_head counted


def test_budget_path_rotates_before_the_statistics_and_reloads(tmp_path):
    grid = {"formats": ["int"], "bits": [3, 8], "group_sizes": [32], "ranks": [0], "metric": "output"}
    recipe = Recipe.from_dict({"allocate": grid, "quantize": {"rounding": "gptq"}, "rotate": ALL})
    base = make_tiny_llama(250)
    ref = logits(base, IDS)
    model, report = api.compress(base, recipe, tmp_path / "b", budget=5.0, calib_data=CALIB, progress=False)
    assert report.layers["model.layers.0.mlp.down_proj"].get("hadamard")
    assert torch.equal(logits(load(tmp_path / "b"), IDS), logits(model, IDS))
    assert float((logits(model, IDS) - ref).abs().max()) <= 0.2 * float(ref.abs().max())
