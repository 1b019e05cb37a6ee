"""K-quant layers (q4_k, q5_k, q6_k) exported as llama.cpp's Q4_K, Q5_K and Q6_K, bit for bit; the token
embedding's GGUF type (default as llama-quantize writes it, `--embedding` to choose); `--target llama.cpp`
offering K-quants where K is a multiple of 256 and llama-quantize's fallback elsewhere.

Tiny random Llama with hidden 256 and MLP 512, so every layer takes a K-quant.
"""

import json

import pytest
import torch

from lowbit.cli import main
from lowbit.compress.allocate.candidates import candidate_grid
from lowbit.compress.allocate.constraints import engine_constraints
from lowbit.compress.api import compress
from lowbit.compress.recipe import Recipe
from lowbit.export import ExportError, export, load_export
from lowbit.export.gguf import embedding_tensor
from lowbit.export.gguf_kquants import kquant_blocks
from lowbit.nn.checkpoint import load
from lowbit.quantizers import QuantSpec, dequantize, quantize
from lowbit.quantizers.engines import llama_cpp_problem, served_group
from tests.conftest import logits, make_tiny_llama
from tests.export.test_gguf_export import byte_tokenizer

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
WIDE = {"hidden_size": 256, "intermediate_size": 512}
MIXED = {
    "target": "llama.cpp",
    "quantize": {"format": "q4_k"},
    "overrides": [
        {"match": "*.down_proj", "quantize": {"format": "q6_k"}},
        {"match": "*.v_proj", "quantize": {"format": "q5_k"}},
    ],
}


def gguf_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def kq(tmp_path_factory):
    """A checkpoint of the wide tiny Llama: q4_k, with q5_k v and q6_k down projections."""
    root, tok = tmp_path_factory.mktemp("kq"), byte_tokenizer()
    model = make_tiny_llama(len(tok), **WIDE)
    compress(model, Recipe.from_dict(MIXED), root / "ckpt", tokenizer=tok, progress=False)
    return root / "ckpt"


@pytest.mark.parametrize(("fmt", "block"), [("q4_k", 144), ("q5_k", 176), ("q6_k", 210)])
def test_blocks_are_what_gguf_py_decodes(fmt, block):
    """gguf-py's reference dequantization (llama.cpp's) of the blocks equals lowbit's dequantize exactly,
    also for all-zero and constant super-blocks."""
    W = torch.randn(16, 768, generator=torch.Generator().manual_seed(0)) * 0.02
    W[0] = 0.0
    W[1, 256:512] = -0.01
    W[2, :256] = 1e-9
    q = quantize(W, QuantSpec(fmt))
    qtype, blocks = kquant_blocks(q)
    assert qtype.name == fmt.upper() and tuple(blocks.shape) == (16, 3 * block)
    got = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), qtype))
    assert torch.equal(got, dequantize(q))


def test_k_quant_checkpoint_exports_as_allocated(kq, tmp_path):
    r = export(kq, tmp_path / "gguf", "gguf", embedding="f32")
    assert r["converted"] == 0
    types = gguf_types(tmp_path / "gguf" / "model.gguf")
    for i in (0, 1):
        assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.ffn_up.weight"] == "Q4_K"
        assert (types[f"blk.{i}.attn_v.weight"], types[f"blk.{i}.ffn_down.weight"]) == ("Q5_K", "Q6_K")
    fields = gguf.GGUFReader(tmp_path / "gguf" / "model.gguf").fields
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_S
    net, _, _ = load_export(tmp_path / "gguf")
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = logits(load(kq), ids)
    assert float((logits(net, ids) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_embedding_type_follows_llama_quantize_and_can_be_chosen():
    E = torch.randn(40, 256, generator=torch.Generator().manual_seed(2))
    assert embedding_tensor(E, "auto", Q.Q4_K, torch.float32)[1] == Q.Q6_K
    assert embedding_tensor(E, "auto", Q.Q8_0, torch.float32)[1] == Q.Q8_0  # a Q8_0 file keeps Q8_0
    assert embedding_tensor(E[:, :64], "auto", Q.Q4_K, torch.float32)[1] == Q.Q8_0  # 64 % 256 != 0
    assert embedding_tensor(E[:, :40], "auto", None, torch.float16)[1] == Q.F16  # not even 32: dtype
    assert embedding_tensor(E, "f16", Q.Q4_K, torch.float32)[1] == Q.F16
    data, qtype = embedding_tensor(E, "q8_0", None, torch.float32)
    want = dequantize(quantize(E, QuantSpec("int8", 32, True)))  # lowbit's round-to-nearest, exactly
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(data.numpy(), qtype)), want)
    with pytest.raises(ExportError, match="multiple of 256"):
        embedding_tensor(E[:, :64], "q6_k", None, torch.float32)


def test_embedding_option_on_the_command_line(kq, tmp_path, capsys):
    out = tmp_path / "gguf"
    argv = ["export", str(kq), "--to", "gguf", "--out", str(out), "--json"]
    assert main([*argv, "--embedding", "q8_0"]) == 0
    assert json.loads(capsys.readouterr().out)["embedding"] == "q8_0"
    assert gguf_types(out / "model.gguf")["token_embd.weight"] == "Q8_0"
    assert main([*argv, "--overwrite"]) == 0  # default: Q6_K (hidden 256, main type Q4_K)
    assert gguf_types(out / "model.gguf")["token_embd.weight"] == "Q6_K"
    with pytest.raises(ExportError, match="gguf exports only"):
        export(kq, tmp_path / "dense", "dense", embedding="q8_0")
    with pytest.raises(ExportError, match="unknown embedding type"):
        export(kq, tmp_path / "bad", "gguf", embedding="q4")
    assert not (tmp_path / "dense").exists() and not (tmp_path / "bad").exists()


def test_llama_cpp_takes_k_quants_where_k_is_a_multiple_of_256():
    q4k = QuantSpec("q4_k")
    assert llama_cpp_problem(q4k, 1536) is None and llama_cpp_problem(q4k, None) is None
    assert "multiple of q4_k's super-block of 256" in llama_cpp_problem(q4k, 576)
    # llama-quantize's fallback (Q5_0 / Q5_1 / Q8_0) as the nearest type lowbit writes
    assert served_group("llama.cpp", q4k, 576) == QuantSpec("int4", 32)
    assert served_group("llama.cpp", QuantSpec("q6_k"), 576) == QuantSpec("int8", 32, True)
    assert served_group("llama.cpp", q4k, 1536) == q4k and served_group("lowbit", q4k, 576) == q4k
    grid = candidate_grid(("int", "kquant"), (4, 6), (64, 128), (0,))
    assert [c.spec.format for c in grid] == ["int4", "int4", "q4_k", "q6_k"]  # one spec per K-quant
    mask, _ = engine_constraints(["a.down_proj", "a.o_proj"], [(576, 1536), (576, 576)], grid, "llama.cpp")
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]


def test_uniform_k_quant_recipe_falls_back_per_layer_for_llama_cpp(tmp_path):
    """K = 64 / 160 layers take Q4_1 (int4 g32 asymmetric) in a q4_k recipe made for llama.cpp; the
    export then converts nothing."""
    tok = byte_tokenizer()
    out = tmp_path / "ckpt"
    recipe = Recipe.from_dict({"target": "llama.cpp", "quantize": {"format": "q4_k"}})
    compress(make_tiny_llama(len(tok)), recipe, out, tokenizer=tok, progress=False)
    assert {m.spec for m in load(out).modules() if hasattr(m, "spec")} == {QuantSpec("int4", 32)}
    assert export(out, tmp_path / "gguf", "gguf")["converted"] == 0
