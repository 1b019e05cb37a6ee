"""A bf16 source stays bf16: loaded in its own dtype, quantized from fp32 per layer, unquantized tensors
written in bf16; the codes equal those of the same model loaded in fp32."""

import pytest
import torch
from safetensors import safe_open

from lowbit.compress import dry_run
from lowbit.compress.api import compress
from lowbit.models import load_model
from lowbit.nn.checkpoint import load
from tests.conftest import NEWS, make_tiny_llama, make_tokenizer


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bf16")
    tok = make_tokenizer(NEWS)
    make_tiny_llama(len(tok)).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tensors(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_source_dtype_is_kept_and_codes_match_the_fp32_load(bf16_dir, tmp_path):
    model, _ = load_model(str(bf16_dir))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    compress(str(bf16_dir), "int4-g128", tmp_path / "bf16", progress=False)
    fp32, tok = load_model(str(bf16_dir), dtype=torch.float32)
    compress(fp32, "int4-g128", tmp_path / "fp32", tokenizer=tok, progress=False)
    a, b = tensors(tmp_path / "bf16"), tensors(tmp_path / "fp32")
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype == torch.uint8 or k.endswith(".scales"):
            assert torch.equal(a[k], b[k]), k  # quantized fields: bit for bit
        else:
            assert a[k].dtype == torch.bfloat16 and torch.equal(a[k].float(), b[k]), k
    plan = dry_run(str(bf16_dir), "int4-g128")
    assert plan.dtype == "bfloat16"
    real = sum(p.stat().st_size for p in (tmp_path / "bf16").rglob("*") if p.is_file())
    assert abs(plan.output_bytes[0] - real) / real < 0.03


def test_bf16_source_with_gptq_reloads_and_runs(bf16_dir, tmp_path):
    calib = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    model, _ = load_model(str(bf16_dir))
    compress(model, "int4-g128-gptq", tmp_path / "gptq", calib_data=calib, progress=False)
    net = load(tmp_path / "gptq")
    assert net.get_input_embeddings().weight.dtype == torch.bfloat16
    assert torch.isfinite(net(calib).logits.float()).all()
