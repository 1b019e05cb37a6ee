"""SVDQuant smoothing folded into the norms (lowbit.compress.smoothing) by the compress pipeline.

The layers reading a norm share one lambda, folded into the norm's weight; o_proj and down_proj keep their
own in their QLinear. Folding changes the logits by float32 rounding only: against a reference that keeps
the same lambda in every QLinear (norms as they were), within 1e-5 of the logits' scale.
"""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.compress.api import compress
from lowbit.compress.recipe import Recipe
from lowbit.compress.uniform import quantize_model
from lowbit.export.fit import effective_weight
from lowbit.nn.checkpoint import save
from lowbit.nn.qlinear import QLinear
from lowbit.nn.smoothing import fold_into_norm
from tests.conftest import logits, make_tiny_llama

SEQ = 32
EXCLUDED = "model.layers.0.self_attn.k_proj"  # a dense reader of a folded norm
LLAMA_GROUPS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
PHI3_GROUPS = {"input_layernorm": ("self_attn.qkv_proj",), "post_attention_layernorm": ("mlp.gate_up_proj",)}
OWN = ("self_attn.o_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(0, 300, (8, SEQ), generator=torch.Generator().manual_seed(0))


def with_outlier_norms(model: nn.Module) -> nn.Module:
    """Norm weights in [0.5, 1.5] with 3 channels 20x larger: activation outliers for smoothing to move."""
    g = torch.Generator().manual_seed(1)
    for name, m in model.named_modules():
        if name.endswith("norm"):
            w = 0.5 + torch.rand(m.weight.shape, generator=g)
            w[torch.randperm(w.numel(), generator=g)[:3]] *= 20
            m.weight.data = w
    return model


def tiny_phi3() -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    return Phi3ForCausalLM(cfg).eval()


def svdquant_recipe(exclude=("lm_head",)) -> Recipe:
    return Recipe.from_dict(
        {
            "quantize": {"format": "int4", "group_size": 32},
            "decompose": {"method": "svdquant", "rank": 4},
            "calibration": {"samples": 8, "seq_len": SEQ},
            "exclude": list(exclude),
        }
    )


def unfolded(model: nn.Module, original: nn.Module, groups: dict) -> nn.Module:
    """The reference built by hand: every norm restored, lambda = original weight / folded weight kept
    in each of its readers' QLinears (dense readers get their original weight back)."""
    ref = copy.deepcopy(model)
    for i, block in enumerate(ref.model.layers):
        for norm, readers in groups.items():
            weight = block.get_submodule(norm).weight
            before = original.model.layers[i].get_submodule(norm).weight.detach()
            lam = before / weight.detach()
            weight.data = before.clone()
            for r in readers:
                m = block.get_submodule(r)
                if isinstance(m, QLinear):
                    assert m.smooth is None
                    m.smooth = lam.clone()
                else:
                    m.weight.data = original.model.layers[i].get_submodule(r).weight.detach().clone()
    return ref


def layer_inputs(model: nn.Module, blocks) -> dict[str, torch.Tensor]:
    """Every nn.Linear's input x [B * L, K] on blocks."""
    xs, hooks = {}, []

    def keep(name: str, x: torch.Tensor) -> None:  # a pre-hook returning None leaves the input as it is
        xs[name] = x.flatten(0, -2)

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(lambda _, a, n=name: keep(n, a[0])))
    logits(model, blocks)
    for h in hooks:
        h.remove()
    return xs


@torch.no_grad()
def check_lambdas_match(ref: nn.Module, original: nn.Module, blocks) -> None:
    """Each QLinear of the reference, (Q + L1 L2) / lambda, approximates its original layer on the original
    model's inputs: relative output error < 0.1 (0.02 for the folded readers, 0.07 for o/down_proj; a reader
    decomposed with a lambda other than its norm's shared one is off by 0.4 to 0.9)."""
    xs = layer_inputs(original, blocks)
    for name, m in ref.named_modules():
        if isinstance(m, QLinear):
            W, x = original.get_submodule(name).weight.detach(), xs[name]
            assert float((x @ (effective_weight(m) - W).T).norm() / (x @ W.T).norm()) < 0.1, name


def check_folded(model: nn.Module, original: nn.Module, groups: dict, blocks, tmp_path) -> None:
    """Readers without smooth, norms changed, o_proj / down_proj smoothed, reference and reload exact."""
    for i, block in enumerate(model.model.layers):
        for norm, readers in groups.items():
            assert not torch.equal(
                block.get_submodule(norm).weight, original.model.layers[i].get_submodule(norm).weight
            )
            for r in readers:
                m = block.get_submodule(r)
                assert m.smooth is None if isinstance(m, QLinear) else f"model.layers.{i}.{r}" == EXCLUDED
        assert all(block.get_submodule(n).smooth is not None for n in OWN)
    ref_model = unfolded(model, original, groups)
    check_lambdas_match(ref_model, original, blocks)
    ref, got = logits(ref_model, blocks), logits(model, blocks)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    plan = {n: m.layer_plan() for n, m in model.named_modules() if isinstance(m, QLinear)}
    save(model, tmp_path / "ck", plan=plan)
    assert torch.equal(logits(lowbit.load(tmp_path / "ck"), blocks), got)
    assert float((got - logits(original, blocks)).pow(2).mean()) < 0.1 * float(logits(original, blocks).var())


def test_llama_shares_and_folds_lambda_per_norm(blocks, tmp_path):
    original = with_outlier_norms(make_tiny_llama(300))
    model, teacher = copy.deepcopy(original), copy.deepcopy(original)
    recipe = svdquant_recipe(exclude=("lm_head", EXCLUDED))
    plan = quantize_model(model, recipe, calib_data=blocks, progress=False, teacher=teacher)
    assert len(plan) == 13 and isinstance(model.get_submodule(EXCLUDED), nn.Linear)
    assert not torch.equal(model.get_submodule(EXCLUDED).weight, original.get_submodule(EXCLUDED).weight)
    check_folded(model, original, LLAMA_GROUPS, blocks, tmp_path)
    # the teacher got the same fold: it computes what it did, its readers' weights are W diag(lambda)
    lam = (
        original.model.layers[1].post_attention_layernorm.weight
        / model.model.layers[1].post_attention_layernorm.weight
    )
    up = "model.layers.1.mlp.up_proj"
    torch.testing.assert_close(teacher.get_submodule(up).weight, original.get_submodule(up).weight * lam)
    ref = logits(original, blocks)
    assert float((logits(teacher, blocks) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_phi3_fused_projections_fold(blocks, tmp_path):
    original = with_outlier_norms(tiny_phi3())
    model, report = compress(copy.deepcopy(original), svdquant_recipe(), calib_data=blocks, progress=False)
    assert len(report.layers) == 8
    check_folded(model, original, PHI3_GROUPS, blocks, tmp_path)


def test_fold_into_layernorm_with_bias_keeps_the_function():
    g = torch.Generator().manual_seed(0)
    norm, lin = nn.LayerNorm(16), nn.Linear(16, 8)
    norm.weight.data, norm.bias.data = torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g)
    x, lam = torch.randn(5, 16, generator=g), torch.rand(16, generator=g) + 0.5
    before, bias = lin(norm(x)), norm.bias.detach().clone()
    assert fold_into_norm(norm, x, lam, [lin])
    torch.testing.assert_close(norm.bias.detach(), bias / lam)
    torch.testing.assert_close(lin(norm(x)), before, rtol=1e-5, atol=1e-6)


class OnePlusNorm(nn.Module):
    """Gemma's RMSNorm form, x * (1 + weight): not linear in its weight, so it cannot take a fold."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(k))

    def forward(self, x):
        return x * (1 + self.weight)


def test_a_norm_not_linear_in_its_weight_is_left_alone():
    norm, lin = OnePlusNorm(16), nn.Linear(16, 8)
    w, W = norm.weight.detach().clone(), lin.weight.detach().clone()
    assert not fold_into_norm(norm, torch.randn(5, 16), torch.rand(16) + 0.5, [lin])
    assert torch.equal(norm.weight, w) and torch.equal(lin.weight, W)


def test_budget_path_shares_lambda_per_norm_and_undoes_the_folds_between_budgets(blocks, tmp_path):
    """Each norm's readers share one lambda searched with their allocated specs and ranks; the second
    budget (fine-tuned against a folded teacher too) equals that budget compressed alone, so the first
    budget's folds were undone in the model and the teacher; a resumed run reloads the same lambdas."""
    original = with_outlier_norms(make_tiny_llama(300))
    recipe = Recipe.from_dict(
        svdquant_recipe(exclude=("lm_head", EXCLUDED)).to_dict()
        | {
            "allocate": {"formats": ["int"], "bits": [2, 3, 4], "group_sizes": [32], "ranks": [0, 4]},
            "finetune": {"mode": "peqa", "steps": 2, "batch_size": 2, "seq_len": SEQ, "eval_every": 0},
        }
    )
    kw = dict(calib_data=blocks, work_dir=tmp_path / "work", keep_work=True, progress=False)
    model, report = compress(copy.deepcopy(original), recipe, budgets=[3.5, 5.5], **kw)
    assert {e["rank"] for b in report.budgets for e in b["plan"].values()} == {0, 4}
    check_folded(model, original, LLAMA_GROUPS, blocks, tmp_path)
    alone, _ = compress(copy.deepcopy(original), recipe, budget=5.5, calib_data=blocks, progress=False)
    assert torch.equal(logits(alone, blocks), logits(model, blocks))
    again, _ = compress(copy.deepcopy(original), recipe, budgets=[3.5, 5.5], **kw)
    assert torch.equal(logits(again, blocks), logits(model, blocks))
