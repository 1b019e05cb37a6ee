"""Tests for lowbit.calibration.stats: running statistics, save/load, block discovery, Fisher diagonal."""

import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lowbit.calibration import (
    CalibrationError,
    CalibrationStats,
    LayerStats,
    find_blocks,
    fisher_diagonal,
    select_linears,
)
from lowbit.calibration.stats import check_kinds, check_tokens, hessians_in_turn

VOCAB = 128


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: a second thread costs more than it saves, far more on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    ).eval()


def tokens(samples: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def test_update_matches_statistics_of_all_rows_at_once():
    torch.manual_seed(0)
    scale = torch.linspace(0.1, 5.0, 16)
    xs = [torch.randn(3, 7, 16) * scale for _ in range(3)] + [torch.randn(5, 16).to(torch.bfloat16)]
    st = LayerStats()
    for x in xs:
        st.update(x, ("act", "hessian"))
    X = torch.cat([x.reshape(-1, 16).float() for x in xs])  # [68, 16]
    assert st.tokens == 68
    assert torch.equal(st.act_max, X.abs().amax(0))
    torch.testing.assert_close(st.act_sqmean, X.square().mean(0), rtol=1e-5, atol=0)
    torch.testing.assert_close(st.hessian, X.T @ X, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.hessian_matrix(), 2.0 / 68 * X.T @ X, rtol=1e-5, atol=1e-6)


def test_update_collects_only_the_requested_kinds():
    st = LayerStats()
    st.update(torch.randn(4, 8), ("act",))
    assert st.hessian is None and st.act_max.shape == (8,)
    with pytest.raises(CalibrationError, match="no Hessian"):
        st.hessian_matrix()
    st = LayerStats()
    st.update(torch.randn(4, 8), ("hessian",))
    assert st.act_max is None and st.act_sqmean is None and st.hessian.shape == (8, 8)


def test_save_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    full = LayerStats(torch.rand(8), torch.rand(8), torch.randn(8, 8), tokens=40, fisher=torch.rand(6, 8))
    full.fisher_samples = 5
    stats = CalibrationStats(
        {"model.layers.0.mlp.up_proj": full, "model.layers.0.mlp.down_proj": LayerStats(tokens=40)},
        samples=5,
        seq_len=8,
        tokens=40,
        source="builtin:lee-news",
        seed=3,
    )
    path = tmp_path / "calib.safetensors"
    stats.save(path)
    back = CalibrationStats.load(path)
    assert (back.samples, back.seq_len, back.tokens, back.source, back.seed) == (
        5,
        8,
        40,
        "builtin:lee-news",
        3,
    )
    assert list(back.layers) == list(stats.layers)
    for name, st in stats.layers.items():
        got = back[name]
        assert (got.tokens, got.fisher_samples) == (st.tokens, st.fisher_samples)
        for f in ("act_max", "act_sqmean", "hessian", "fisher"):
            want = getattr(st, f)
            assert (getattr(got, f) is None) if want is None else torch.equal(getattr(got, f), want)


def test_load_rejects_files_that_are_not_calibration_statistics(tmp_path):
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CalibrationError, match="not a lowbit calibration file"):
        CalibrationStats.load(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CalibrationError, match="not a safetensors file"):
        CalibrationStats.load(garbage)
    with pytest.raises(CalibrationError, match="does not exist"):
        CalibrationStats.load(tmp_path / "missing.safetensors")
    with pytest.raises(KeyError, match="no calibration statistics"):
        CalibrationStats()["model.layers.0.mlp.up_proj"]


def test_find_blocks_on_llama_and_gpt2():
    name, blocks = find_blocks(tiny_llama(layers=3))
    assert name == "model.layers" and len(blocks) == 3
    name, blocks = find_blocks(tiny_gpt2())
    assert name == "transformer.h" and len(blocks) == 2


def test_find_blocks_unknown_architecture_raises_clear_error():
    with pytest.raises(CalibrationError, match="num_hidden_layers"):
        find_blocks(nn.Sequential(nn.Linear(4, 4)))
    odd = nn.Module()
    odd.config = SimpleNamespace(num_hidden_layers=3)
    odd.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    with pytest.raises(CalibrationError, match="no nn.ModuleList of 3 decoder blocks"):
        find_blocks(odd)


def test_select_linears_defaults_filters_and_errors():
    model = tiny_llama()
    default = select_linears(model)
    assert len(default) == 14 and "lm_head" not in default
    assert list(default)[0] == "model.layers.0.self_attn.q_proj"
    assert list(select_linears(model, lambda n: n.endswith("down_proj"))) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    with pytest.raises(CalibrationError, match="'lm_head' is not a linear layer inside the decoder blocks"):
        select_linears(model, ["lm_head"])
    assert list(select_linears(model, ["lm_head"], inside_blocks=False)) == ["lm_head"]
    with pytest.raises(CalibrationError, match="no linear layer selected"):
        select_linears(model, lambda n: False)
    gpt2 = select_linears(tiny_gpt2())
    assert list(gpt2)[:2] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"] and len(gpt2) == 8


def test_check_tokens_and_kinds_reject_bad_input():
    model = tiny_llama()
    assert check_tokens(model, tokens(2, 4).int()).dtype == torch.long
    for bad, match in [
        (torch.rand(2, 4), "integer tensor"),
        (torch.zeros(8, dtype=torch.long), "integer tensor"),
        ([[1, 2]], "integer tensor"),
        (torch.full((2, 4), VOCAB), r"token ids must lie in \[0, 128\)"),
        (torch.full((2, 4), -1), "token ids"),
        (torch.zeros(0, 4, dtype=torch.long), "needs >= 1 sample"),
    ]:
        with pytest.raises(CalibrationError, match=match):
            check_tokens(model, bad)
    with pytest.raises(CalibrationError, match="needs >= 1 sample of >= 2 tokens"):
        check_tokens(model, tokens(2, 1), min_len=2)
    assert check_kinds("act") == ("act",)
    for bad in [("act", "gradients"), ()]:
        with pytest.raises(CalibrationError, match="stats must be a non-empty subset"):
            check_kinds(bad)


def naive_fisher(model: nn.Module, data: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """sum_s (dL_s/dW)^2 with L_s the library-computed causal-LM loss of one sample, gradient by gradient."""
    model = copy.deepcopy(model)
    weights = [model.get_submodule(n).weight for n in names]
    F = {n: torch.zeros_like(w) for n, w in zip(names, weights, strict=True)}
    for s in range(data.shape[0]):
        ids = data[s : s + 1]
        loss = model(input_ids=ids, labels=ids).loss
        for n, g in zip(names, torch.autograd.grad(loss, weights), strict=True):
            F[n] += g.square()
    return F


def test_fisher_equals_sum_of_squared_per_sample_gradients():
    model = tiny_llama()
    data = tokens(3, 12)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    F = fisher_diagonal(model, data, names, progress=False)
    want = naive_fisher(model, data, names)
    assert list(F) == names
    for n in names:
        assert F[n].dtype == torch.float32 and F[n].shape == model.get_submodule(n).weight.shape
        torch.testing.assert_close(F[n], want[n], rtol=1e-4, atol=1e-12)
    one = fisher_diagonal(model, data[:1], names, progress=False)
    assert not torch.allclose(one[names[0]], F[names[0]]), "samples must be summed, not overwritten"


def test_fisher_of_gpt2_conv1d_is_laid_out_n_by_k():
    model = tiny_gpt2()
    data = tokens(2, 10)
    name = "transformer.h.1.attn.c_attn"  # Conv1D, weight stored [K=64, N=192]
    F = fisher_diagonal(model, data, [name], progress=False)[name]
    assert F.shape == (192, 64)
    torch.testing.assert_close(F, naive_fisher(model, data, [name])[name].T, rtol=1e-4, atol=1e-12)


def test_fisher_leaves_the_model_as_it_was():
    model = tiny_llama().train()
    model.model.embed_tokens.weight.requires_grad_(False)
    q = model.model.layers[0].self_attn.q_proj.weight
    q.grad = torch.ones_like(q)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fisher_diagonal(model, tokens(2, 8), progress=False)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(q.grad, torch.ones_like(q))
    assert all(p.grad is None for n, p in model.named_parameters() if p is not q)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_statistics_shared_by_layers_reading_one_input_save_and_load(tmp_path):
    from lowbit.calibration import CalibrationStats, LayerStats

    lead = LayerStats()
    lead.update(torch.randn(6, 4), ("act", "hessian"))
    shared = LayerStats(lead.act_max, lead.act_sqmean, lead.hessian, lead.tokens)  # k_proj beside q_proj
    path = tmp_path / "s.safetensors"
    CalibrationStats({"q": lead, "k": shared}, samples=1, seq_len=6, tokens=6).save(path)
    back = CalibrationStats.load(path)
    assert torch.equal(back["k"].hessian, lead.hessian) and torch.equal(back["q"].act_sqmean, lead.act_sqmean)


def test_hessians_in_turn_equal_hessian_matrix_and_are_dropped_after_their_last_reader():
    """q/k/v read one input: one Hessian, normalised in place to hessian_matrix()'s values bit for bit
    and dropped from every sharing LayerStats once v (the last reader asked for) has it."""
    torch.manual_seed(0)
    shared, own = LayerStats(), LayerStats()
    shared.update(torch.randn(6, 16), ("act", "hessian"))
    own.update(torch.randn(6, 8), ("hessian",))
    want = {"qkv": shared.hessian_matrix(), "o": own.hessian_matrix()}
    stats = {"q": shared, "k": LayerStats(shared.act_max, None, shared.hessian, 6), "o": own}
    stats["v"] = LayerStats(shared.act_max, None, shared.hessian, 6)
    take = hessians_in_turn(stats, ["q", "k", "v", "o"])
    H = take("q")
    assert torch.equal(H, want["qkv"]) and take("k") is H
    assert stats["v"].hessian is H  # v still to come
    assert take("v") is H and all(stats[n].hessian is None for n in "qkv")
    assert torch.equal(take("o"), want["o"]) and stats["o"].hessian is None


def test_hessians_in_turn_hold_a_hessian_for_every_entry_of_a_repeated_name():
    """A layer built for two plans (order q, k, q, k): the Hessian is normalised once and held until the
    second k."""
    torch.manual_seed(0)
    shared = LayerStats()
    shared.update(torch.randn(6, 16), ("hessian",))
    want = shared.hessian_matrix()
    stats = {"q": shared, "k": LayerStats(None, None, shared.hessian, 6)}
    take = hessians_in_turn(stats, ["q", "k", "q", "k"])
    H = take("q")
    assert take("k") is H and take("q") is H and stats["k"].hessian is H
    assert take("k") is H and stats["q"].hessian is None and stats["k"].hessian is None
    assert torch.equal(H, want)
