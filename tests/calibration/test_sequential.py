"""Tests for lowbit.calibration.sequential: the block-by-block runner is exact, bounded in memory, and
propagates the outputs of modified or original blocks as asked."""

import copy
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lowbit.calibration import (
    CalibrationError,
    calibrate,
    calibrate_sequential,
    capture_block_inputs,
    find_blocks,
    fisher_diagonal,
    is_linear,
)
from lowbit.calibration.data import calibration_blocks
from lowbit.calibration.sequential import block_kinds
from tests.conftest import make_tokenizer

VOCAB = 128
SHAPE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
)
ARCHS = {
    "llama": lambda n: LlamaForCausalLM(LlamaConfig(num_hidden_layers=n, **SHAPE)),
    "mistral": lambda n: MistralForCausalLM(MistralConfig(num_hidden_layers=n, sliding_window=6, **SHAPE)),
    "qwen2": lambda n: Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=n, **SHAPE)),
    # layer 0 full attention, layer 1 sliding-window attention: the blocks get different masks
    "qwen2-sliding": lambda n: Qwen2ForCausalLM(
        Qwen2Config(
            num_hidden_layers=n, use_sliding_window=True, sliding_window=6, max_window_layers=1, **SHAPE
        )
    ),
    "phi3": lambda n: Phi3ForCausalLM(
        Phi3Config(num_hidden_layers=n, pad_token_id=0, bos_token_id=1, eos_token_id=2, **SHAPE)
    ),
    "gpt2": lambda n: GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=n, n_head=4, n_positions=64)
    ),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: a second thread costs more than it saves, far more on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(arch: str = "llama", layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ARCHS[arch](layers).eval()


def tokens(samples: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def full_forward_inputs(model: nn.Module, data: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every block linear's inputs X: [tokens, K], captured in one ordinary forward of the whole model."""
    prefix, _ = find_blocks(model)
    X: dict[str, list] = {}
    handles = [
        m.register_forward_pre_hook(lambda m, args, name=name: X.setdefault(name, []).append(args[0]))
        for name, m in model.named_modules()
        if is_linear(m) and name.startswith(prefix + ".")
    ]
    with torch.no_grad():
        model(input_ids=data)
    for h in handles:
        h.remove()
    return {name: torch.cat([x.reshape(-1, x.shape[-1]).float() for x in xs]) for name, xs in X.items()}


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    err = (got - want).norm() / want.norm()
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_sequential_statistics_equal_a_full_forward(arch):
    model = tiny(arch)
    data = tokens(5, 16)
    got = calibrate_sequential(model, data, batch_size=2, progress=False)  # micro-batches of 2, 2, 1
    want = full_forward_inputs(model, data)
    assert sorted(got) == sorted(want) and len(want) >= 8
    for name, X in want.items():
        st = got[name]
        assert st.tokens == 80 == X.shape[0]
        assert_rel_close(st.act_max, X.abs().amax(0))
        assert_rel_close(st.act_sqmean, X.square().mean(0))
        assert_rel_close(st.hessian, X.T @ X)


def test_blocks_of_each_attention_kind_get_their_own_inputs():
    model = tiny("qwen2-sliding")
    _, blocks = find_blocks(model)
    kinds = block_kinds(model, len(blocks))
    assert kinds == ["full_attention", "sliding_attention"]
    inputs = capture_block_inputs(model, blocks, kinds, tokens(3, 16), batch_size=2)
    assert len(inputs) == 2 and [x.hidden.shape for x in inputs] == [(2, 16, 64), (1, 16, 64)]
    full, sliding = (inputs[0].context[k][1]["attention_mask"] for k in kinds)
    assert sliding is not None and not (isinstance(full, torch.Tensor) and torch.equal(full, sliding))


def test_calibrate_collects_every_kind_and_leaves_the_model_as_it_was():
    model = tiny("llama").train()
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    data = tokens(3, 12)
    stats = calibrate(model, data, stats=("act", "hessian", "fisher"), progress=False)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert (stats.samples, stats.seq_len, stats.tokens, stats.source) == (3, 12, 36, "tensor")
    assert len(stats.layers) == 14 and "lm_head" not in stats.layers
    F = fisher_diagonal(model, data, progress=False)
    for name, st in stats.layers.items():
        assert st.tokens == 36 and st.fisher_samples == 3
        assert st.act_max.shape == st.act_sqmean.shape == st.hessian.shape[:1] == st.fisher.shape[1:]
        assert torch.equal(st.fisher, F[name])


def test_calibrate_from_a_text_source(news_file):
    tok = make_tokenizer([news_file.read_text()])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **{**SHAPE, "vocab_size": len(tok)})).eval()
    stats = calibrate(
        model, str(news_file), samples=3, seq_len=16, stats=("act",), tokenizer=tok, progress=False
    )
    assert (stats.samples, stats.seq_len, stats.source, stats.seed) == (3, 16, str(news_file), 0)
    blocks = calibration_blocks(tok, str(news_file), 3, 16, seed=0)
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(
        stats[name].act_max, calibrate(model, blocks, stats=("act",), progress=False)[name].act_max
    )
    with pytest.raises(CalibrationError, match="pass a tokenizer"):
        calibrate(model, str(news_file), progress=False)


def test_layer_filter_and_bad_arguments():
    model = tiny("llama")
    data = tokens(2, 8)
    got = calibrate_sequential(model, data, layers=["model.layers.1.mlp.down_proj"], progress=False)
    assert list(got) == ["model.layers.1.mlp.down_proj"]
    with pytest.raises(CalibrationError, match="'lm_head' is not a linear layer inside the decoder blocks"):
        calibrate_sequential(model, data, layers=["lm_head"], progress=False)
    with pytest.raises(CalibrationError, match="propagate must be one of"):
        calibrate_sequential(model, data, propagate="neither", progress=False)
    with pytest.raises(CalibrationError, match="stats must be a non-empty subset"):
        calibrate_sequential(model, data, stats=("fisher",), progress=False)
    with pytest.raises(CalibrationError, match="batch_size"):
        calibrate_sequential(model, data, batch_size=0, progress=False)
    with pytest.raises(CalibrationError, match="token blocks"):
        calibrate(model, 3.5, progress=False)


class NoBlocksCalled(nn.Module):
    """Declares two layers but its forward never runs them."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2)
        self.embed = nn.Embedding(VOCAB, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids, **kwargs):
        return self.embed(input_ids)


def test_unknown_architectures_raise_calibration_error():
    with pytest.raises(CalibrationError, match="num_hidden_layers"):
        calibrate(nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, 8)), tokens(2, 8), progress=False)
    with pytest.raises(CalibrationError, match="never called its decoder block 0"):
        calibrate(NoBlocksCalled(), tokens(2, 8), progress=False)


def replace_linears_by_zeros(block: nn.Module) -> None:
    """Swap every linear of the block for a new all-zero one (how a compressor swaps in quantized layers)."""
    for name, m in list(block.named_modules()):
        if isinstance(m, nn.Linear):
            zero = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            nn.init.zeros_(zero.weight)
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent), attr, zero)


@pytest.mark.parametrize("propagate", ["quantized", "original"])
def test_propagate_quantized_feeds_modified_outputs_original_does_not(propagate):
    model = tiny("llama", layers=3)
    data = tokens(3, 12)
    base = calibrate_sequential(copy.deepcopy(model), data, progress=False)
    calls = []

    def on_block(index, block, block_stats):
        calls.append((index, list(block_stats)))
        if index == 0:
            replace_linears_by_zeros(block)

    got = calibrate_sequential(model, data, on_block=on_block, propagate=propagate, progress=False)
    assert [i for i, _ in calls] == [0, 1, 2]
    assert calls[1][1] == [n for n in base if n.startswith("model.layers.1.")]
    assert model.model.layers[0].mlp.down_proj.weight.abs().sum() == 0
    modified = full_forward_inputs(model, data)  # what each block sees once block 0 is replaced
    for name, st in got.items():
        if name.startswith("model.layers.0.") or propagate == "original":
            assert torch.equal(st.hessian, base[name].hessian) and torch.equal(st.act_max, base[name].act_max)
        else:
            assert not torch.allclose(st.hessian, base[name].hessian, rtol=1e-2)
            assert_rel_close(st.hessian, modified[name].T @ modified[name])


def test_keep_false_hands_statistics_to_the_callback_only():
    seen = {}
    got = calibrate_sequential(
        tiny("llama"), tokens(2, 8), on_block=lambda i, b, s: seen.update(s), keep=False, progress=False
    )
    assert got == {} and len(seen) == 14


def peak_live_block_outputs(layers: int, propagate: str) -> int:
    """The most block outputs alive at once while the runner goes through a `layers`-deep model."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(cfg).eval()
    refs: list[weakref.ref] = []
    peak = 0

    def track(module, args, out):
        nonlocal peak
        refs.append(weakref.ref(out))
        peak = max(peak, sum(r() is not None for r in refs))

    for block in model.model.layers:
        block.register_forward_hook(track)
    calibrate_sequential(
        model, tokens(8, 4), batch_size=2, on_block=lambda i, b, s: None, propagate=propagate, progress=False
    )
    return peak


@pytest.mark.parametrize("propagate", ["quantized", "original"])
def test_live_activations_do_not_grow_with_depth(propagate):
    shallow, deep = peak_live_block_outputs(3, propagate), peak_live_block_outputs(24, propagate)
    # 4 micro-batches: one hidden-state tensor per micro-batch plus the one being computed
    assert deep == shallow <= 4 + 1


def test_layers_reading_one_input_share_one_hessian():
    torch.manual_seed(0)
    model = ARCHS["llama"](2).eval()
    data = torch.randint(0, VOCAB, (5, 12))
    stats = calibrate_sequential(model, data, batch_size=2, progress=False)
    attn, mlp = "model.layers.1.self_attn", "model.layers.1.mlp"
    q, k, v = (stats[f"{attn}.{p}_proj"] for p in "qkv")
    assert k.hessian is q.hessian and v.hessian is q.hessian and v.act_max is q.act_max
    assert stats[f"{mlp}.up_proj"].hessian is stats[f"{mlp}.gate_proj"].hessian
    assert stats[f"{mlp}.down_proj"].hessian is not stats[f"{mlp}.up_proj"].hessian
    # the shared Hessian is each reader's own X^T X
    seen = []
    layer = model.get_submodule(f"{attn}.v_proj")
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64).float()))
    calibrate_sequential(model, data, batch_size=2, progress=False, layers=[f"{attn}.o_proj"])
    handle.remove()
    X = torch.cat(seen)
    torch.testing.assert_close(v.hessian, X.T @ X, rtol=1e-5, atol=1e-4)
    assert v.tokens == X.shape[0]
