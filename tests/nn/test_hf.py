"""transformers-native loading: `AutoModelForCausalLM.from_pretrained(dir)` of a lowbit checkpoint runs
exactly as `lowbit.load(dir)`."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lowbit.compress.api import compress
from lowbit.compress.recipe import DecomposeConfig, Override, QuantizeConfig, Recipe
from lowbit.nn.checkpoint import load, save
from lowbit.nn.hf_quantizer import (
    QUANT_METHOD,
    HfIntegrationError,
    _classes,
    register,
    register_when_imported,
)
from lowbit.nn.manifest import read_manifest, sha256
from lowbit.nn.qlinear import QLinear
from tests.conftest import NEWS, as_format_1, make_tiny_llama, make_tokenizer

transformers = pytest.importorskip("transformers")

RECIPE = Recipe(
    quantize=QuantizeConfig(format="int4", group_size=32),
    decompose=DecomposeConfig(method="lorc", rank=4),
    overrides=(
        Override("*.down_proj", QuantizeConfig(format="nf4", group_size=32, double_quant=True)),
        Override("*.o_proj", QuantizeConfig(format="fp8_e4m3", group_size=None)),
    ),
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = make_tokenizer(NEWS)
    path = tmp_path_factory.mktemp("hf") / "ckpt"
    compress(make_tiny_llama(len(tok)), RECIPE, path, tokenizer=tok, progress=False)
    register()
    return path


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_config_json_carries_the_plan(ckpt):
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == QUANT_METHOD and qc["format_version"] == 2
    assert qc["layers"] == read_manifest(ckpt)["layers"]


def test_from_pretrained_equals_lowbit_load(ckpt, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu")
    ref = load(ckpt)
    assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), QLinear)
    assert model.get_submodule("model.layers.0.mlp.down_proj").scales.dtype == torch.uint8  # double quant
    assert torch.equal(logits(model, ids), logits(ref, ids))
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids[:1, :4], **kw), ref.generate(ids[:1, :4], **kw))


def test_bfloat16_load_matches_lowbit_load_in_bfloat16(ckpt, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.l1.dtype == torch.bfloat16 and layer.scales.dtype == torch.float16  # stored dtype kept
    assert torch.equal(logits(model, ids), logits(load(ckpt, dtype=torch.bfloat16), ids))


def test_lowbit_save_of_a_transformers_loaded_model_round_trips_with_its_manifest(ckpt, ids, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    save(model, tmp_path / "again")
    assert read_manifest(tmp_path / "again")["layers"] == read_manifest(ckpt)["layers"]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(logits(again, ids), logits(load(ckpt), ids))
    assert torch.equal(logits(load(tmp_path / "again"), ids), logits(load(ckpt), ids))


def test_save_pretrained_which_cannot_write_the_manifest_is_refused(ckpt, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "copy")


def test_a_folder_without_manifest_is_refused_not_loaded_unchecked(ckpt, tmp_path):
    bad = _altered(ckpt, tmp_path, lambda folder: (folder / "lowbit_config.json").unlink())
    with pytest.raises(HfIntegrationError, match="no lowbit_config.json.*lowbit.save"):
        transformers.AutoModelForCausalLM.from_pretrained(bad)


def _altered(ckpt, tmp_path, change):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    change(bad)
    return bad


def _flip_a_byte(folder):
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 1
    f.write_bytes(bytes(data))


def test_from_pretrained_refuses_a_bit_flipped_file(ckpt, tmp_path):
    bad = _altered(ckpt, tmp_path, _flip_a_byte)
    with pytest.raises(HfIntegrationError, match="model.safetensors is corrupt"):
        transformers.AutoModelForCausalLM.from_pretrained(bad)


def test_from_pretrained_refuses_oversized_config_before_building_the_model(ckpt, tmp_path):
    def grow(folder):
        config = json.loads((folder / "config.json").read_text())
        config["num_hidden_layers"] = 20000
        (folder / "config.json").write_text(json.dumps(config))
        manifest = json.loads((folder / "lowbit_config.json").read_text())
        manifest["files"]["config.json"] = sha256(folder / "config.json")
        (folder / "lowbit_config.json").write_text(json.dumps(manifest))

    bad = _altered(ckpt, tmp_path, grow)
    with pytest.raises(HfIntegrationError, match="num_hidden_layers 20000"):
        transformers.AutoModelForCausalLM.from_pretrained(bad)


WITHOUT_LOWBIT = """
import sys, torch, transformers
try:
    m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
except Exception as e:
    assert "lowbit" not in sys.modules
    print("REFUSED", e)
else:
    print("LOADED")
"""


def test_transformers_without_lowbit_refuses_and_says_to_import_lowbit(ckpt):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # lowbit must not be importable by accident through a .pth either
    r = subprocess.run(
        [sys.executable, "-c", WITHOUT_LOWBIT, str(ckpt)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("REFUSED") and "import lowbit before loading" in r.stdout, r.stdout


def test_format_1_with_asymmetric_int_is_refused_with_the_way_to_rewrite_it(ckpt, ids, tmp_path):
    old = as_format_1(ckpt, tmp_path / "v1")
    with pytest.raises(HfIntegrationError, match=r"format_version 1\) stores a byte per zero point"):
        transformers.AutoModelForCausalLM.from_pretrained(old)
    save(load(old), tmp_path / "v2")  # what the message says
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "v2")
    assert torch.equal(logits(model, ids), logits(load(ckpt), ids))


def test_register_is_idempotent():
    from transformers.quantizers import auto

    register()
    register()
    register_when_imported()
    config_cls, quantizer_cls = _classes()
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] is config_cls
    assert auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is quantizer_cls


def test_bad_quantization_configs_are_refused():
    config_cls, _ = _classes()
    with pytest.raises(HfIntegrationError, match="needs 'layers'"):
        config_cls(layers={})
    with pytest.raises(HfIntegrationError, match="format_version 99"):
        config_cls(layers={"a": {}}, format_version=99)
    with pytest.raises(HfIntegrationError, match="manifest layer 'a'"):
        config_cls(layers={"a": {"spec": {}}})


def test_import_hook_runs_register_right_after_the_registry_module_is_imported(tmp_path, monkeypatch):
    import lowbit.nn.hf_quantizer as hf

    (tmp_path / "registry_probe.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(hf, "REGISTRY_MODULE", "registry_probe")
    calls = []
    monkeypatch.setattr(hf, "register", lambda: calls.append(sys.modules["registry_probe"].LOADED))
    hf.register_when_imported()
    hf.register_when_imported()  # one finder, not two
    assert calls == [] and sum(isinstance(f, hf._RegisterAfterImport) for f in sys.meta_path) == 1
    import registry_probe  # noqa: F401

    assert calls == [True] and not any(isinstance(f, hf._RegisterAfterImport) for f in sys.meta_path)
    monkeypatch.delitem(sys.modules, "registry_probe")


@pytest.mark.slow
def test_import_hook_registers_before_transformers_is_imported(ckpt):
    code = (
        "import sys\n"
        "from lowbit.nn.hf_quantizer import register_when_imported\n"
        "register_when_imported()\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r})\n"
        "print(type(m.model.layers[0].self_attn.q_proj).__name__)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("QLinear")
