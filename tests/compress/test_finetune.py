"""Fine-tuning of compressed models: each mode trains only what it says, exports valid checkpoints,
resumes identically, is deterministic, stops early, and learns a learnable objective."""

import copy
import math

import pytest
import torch
from torch import nn

from lowbit.compress.finetune import (
    FinetuneConfig,
    FinetuneError,
    batch_indices,
    export_layers,
    finetune,
    lr_factor,
    objective_loss,
    prepare_layers,
    sample_blocks,
    trainable_tensors,
)
from lowbit.compress.finetune.fakequant import FakeQuantLinear
from lowbit.compress.rotation import rotate_down
from lowbit.lowrank import decompose
from lowbit.nn.checkpoint import load, model_plan, save
from lowbit.nn.qlinear import QLinear, QLinearError, set_submodule
from lowbit.quantizers import QuantSpec, dequantize, quantize, unpack_codes
from lowbit.quantizers.fake import requantize
from tests.conftest import make_tiny_llama

VOCAB = 128
# per layer, cycled: every format family, ragged groups (K = 160 with g64), double quantization,
# bf16 / fp32 scales, symmetric and asymmetric INT; ranks 0, 4, 2; SVDQuant smoothing on rank-4 layers
SPECS = [
    QuantSpec("int4", 32),
    QuantSpec("int3", 64, symmetric=True),
    QuantSpec("nf4", 32, double_quant=True),
    QuantSpec("fp8_e4m3", None),
    QuantSpec("fp4_e2m1", 32),
    QuantSpec("nf3", 64, scale_dtype="bfloat16"),
    QuantSpec("int2", 64, scale_dtype="float32"),
]
RANKS = [0, 4, 2]
QFIELDS = ("codes", "scales", "zeros", "dq_absmax")
BLOCKS = torch.randint(0, VOCAB, (12, 16), generator=torch.Generator().manual_seed(0))


def compress(model: nn.Module, ranks=RANKS) -> nn.Module:
    """Replace every linear layer but the (tied) lm_head by a QLinear of its spec and rank."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    g = torch.Generator().manual_seed(1)
    for i, (name, lin) in enumerate(linears):
        spec, rank = SPECS[i % len(SPECS)], ranks[i % len(ranks)]
        method = "none" if not rank else ("svdquant" if rank == 4 else "lorc")
        act_max = 0.5 + torch.rand(lin.in_features, generator=g)
        d = decompose(lin.weight.detach().float(), spec, rank, method, act_max=act_max, alpha=0.5)
        dt = lin.weight.dtype
        l1, l2, smooth = (None if t is None else t.to(dt) for t in (d.l1, d.l2, d.smooth))
        set_submodule(model, name, QLinear.from_linear(lin, d.q, l1, l2, smooth))
    return model


@pytest.fixture(scope="module")
def teacher():
    return make_tiny_llama(VOCAB)


@pytest.fixture(scope="module")
def student(teacher):
    return compress(copy.deepcopy(teacher))


def fresh(student):
    return copy.deepcopy(student)


def config(mode, **kw):
    base = dict(mode=mode, steps=4, lr=1e-2, scale_lr=1e-3, batch_size=2, seq_len=16, eval_blocks=0, warmup=0)
    return FinetuneConfig(**{**base, **kw})


def snapshot(model):
    return {k: t.detach().clone() for k, t in model.state_dict().items()}


def qlinear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, QLinear)]


def logits(model, x=BLOCKS[:3]):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def test_the_test_model_mixes_formats_ranks_and_smoothing(student):
    layers = [student.get_submodule(n) for n in qlinear_names(student)]
    assert {m.rank for m in layers} == {0, 2, 4} and any(m.smooth is not None for m in layers)
    assert {m.spec.kind for m in layers} == {"int", "nf", "fp"}


@pytest.mark.parametrize("mode", ["lora", "peqa", "l4q", "lsq"])
def test_each_mode_trains_only_what_it_says(teacher, student, mode):
    model = fresh(student)
    before = snapshot(model)
    ranks = {n: model.get_submodule(n).rank for n in qlinear_names(model)}
    report = finetune(model, teacher, config=config(mode), blocks=BLOCKS, progress=False)
    after = snapshot(model)
    names = qlinear_names(model)
    assert report.plan == model_plan(model) and report.steps == 4
    owned = {f"{n}.{f}" for n in names for f in (*QFIELDS, "l1", "l2")}
    for key in set(before) - owned:  # embeddings, norms, biases, smoothing vectors
        assert torch.equal(before[key], after[key]), key
    for n in names:
        same = {
            f: torch.equal(before[f"{n}.{f}"], after[f"{n}.{f}"]) for f in QFIELDS if f"{n}.{f}" in before
        }
        rank = model.get_submodule(n).rank
        if mode == "l4q":
            assert rank == 0 and f"{n}.l1" not in after and f"{n}.l2" not in after
            assert not same["codes"] and not same["scales"]
            continue
        assert rank == ranks[n]
        lowrank_same = all(torch.equal(before[f"{n}.{f}"], after[f"{n}.{f}"]) for f in ("l1", "l2") if rank)
        if mode == "lora":
            assert all(same.values()) and lowrank_same == (rank == 0)
        elif mode == "peqa":
            assert same["codes"] and same.get("zeros", True) and not same["scales"] and lowrank_same
        else:
            assert not same["scales"] and lowrank_same == (rank == 0)


def test_lora_adds_new_adapters_where_a_layer_has_none(teacher, student, tmp_path):
    """QLoRA on rank-0 layers: new factors start at L1 L2 = 0, train, are stored in float16 and reload;
    the layers that had factors keep their rank and dtype; the quantized part stays bit-identical."""
    model = fresh(student)
    before, ranks = snapshot(model), {n: model.get_submodule(n).rank for n in qlinear_names(model)}
    prepared = fresh(student)
    layers = prepare_layers(prepared, "lora", adapter_rank=3)
    for n, (q, _) in layers.items():
        assert q.rank == (ranks[n] or 3)
        if not ranks[n]:
            assert not q.l1.any() and q.l2.abs().max() <= 1 / math.sqrt(q.in_features)
    torch.testing.assert_close(logits(prepared), logits(student), rtol=1e-5, atol=1e-5)
    cfg = config("lora", steps=3, adapter_rank=3)
    report = finetune(model, teacher, config=cfg, blocks=BLOCKS, progress=False)
    after = snapshot(model)
    assert report.trained_layers == len(ranks) and report.plan == model_plan(model)
    for n, r in ranks.items():
        q = model.get_submodule(n)
        assert all(
            torch.equal(before[f"{n}.{f}"], after[f"{n}.{f}"]) for f in QFIELDS if f"{n}.{f}" in before
        )
        assert q.rank == (r or 3) and q.l1.dtype == (before[f"{n}.l1"].dtype if r else torch.float16)
        assert q.l1.any()
    save(model, tmp_path / "ckpt", plan=report.plan)
    assert torch.equal(logits(load(tmp_path / "ckpt")), logits(model))


@pytest.mark.parametrize("mode", ["lora", "peqa", "l4q", "lsq"])
def test_fine_tuned_model_saves_and_reloads_to_the_same_outputs(teacher, student, mode, tmp_path):
    model = fresh(student)
    report = finetune(model, teacher, config=config(mode, steps=2), blocks=BLOCKS, progress=False)
    save(model, tmp_path / "ckpt", plan=report.plan)
    assert torch.equal(logits(load(tmp_path / "ckpt")), logits(model))


def test_gradients_flow_through_the_ste_to_scales_and_lora_factors(teacher, student):
    model = fresh(student)
    layers = prepare_layers(model, "l4q", teacher, rank=4)
    params = trainable_tensors(layers)
    assert all(isinstance(m, FakeQuantLinear) for _, m in layers.values())
    assert {n.rsplit(".", 1)[1] for n in params} == {"s", "z", "lora_a", "lora_b"}
    objective_loss(model, None, BLOCKS[:4], "lm").backward()
    for name, p in params.items():
        kind = name.rsplit(".", 1)[1]
        if kind == "lora_a":  # B = 0 at the start: no gradient reaches A yet
            assert torch.equal(p.grad, torch.zeros_like(p))
        elif kind != "z":  # zero points only move where weights clamp
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mode", ["lsq", "l4q"])
def test_compressed_latent_starts_from_the_compressed_model(teacher, student, mode):
    """latent "compressed": the teacher's weight clipped into the stored codes' cells, with the stored
    scales, so training starts at the compressed layer exactly (codes that are not round-to-nearest of the
    teacher's weight, as GPTQ's, survive; l4q: on rank-0 layers, it merges the others' factors) while the
    latent lies off the grid, where LSQ's step-size gradient is not zero; "original" restarts the codes
    from round-to-nearest of the teacher's weight."""
    other = copy.deepcopy(teacher)  # a teacher whose round-to-nearest codes differ from the student's
    g = torch.Generator().manual_seed(2)
    for m in other.modules():
        if isinstance(m, nn.Linear):
            m.weight.data += 0.5 * m.weight.std() * torch.randn(m.weight.shape, generator=g)
    # (latent, inset): l4q starts on the cell's edge by default, where a small step of B A flips the codes
    # moved into the cell back to round-to-nearest; halfway (latent_inset 0.5, lsq's default) it keeps them
    starts = [("compressed", None), ("original", None)] + ([("compressed", 0.5)] if mode == "l4q" else [])
    for latent, inset in starts:
        model = fresh(student)
        layers = prepare_layers(model, mode, other, rank=4, latent=latent, inset=inset)
        flipped = []
        for n, (q, fake) in layers.items():
            if mode == "l4q" and q.rank:
                continue
            grid = dequantize(q.qtensor())
            assert torch.equal(fake.weight(), grid) == (latent == "compressed"), (n, latent)
            assert (fake.w0 != grid).float().mean() > 0.3, n
            if latent == "compressed":  # a small step of the scales (lsq) or of B A (l4q)
                nudge = 1 + 2e-3 * torch.randn(fake.w0.shape, generator=g)  # relative: FP cells are too
                w, s = (fake.w0, fake.s * 1.002) if mode == "lsq" else (fake.w0 * nudge, fake.s)
                moved = unpack_codes(requantize(w, s, fake.z, fake.spec))
                flipped.append((moved != unpack_codes(q.qtensor())).float().mean())
        if latent == "compressed":
            halfway = mode == "lsq" or inset == 0.5
            assert (max(flipped) < 0.01) if halfway else (max(flipped) > 0.05), (mode, inset, flipped)
        if mode == "lsq" and latent == "compressed":
            torch.testing.assert_close(logits(model), logits(student), rtol=1e-4, atol=1e-4)
            objective_loss(model, other, BLOCKS[:4], "distill").backward()
            for n, (_, fake) in layers.items():
                assert fake.s.grad.abs().sum() > 0, n
    with pytest.raises(FinetuneError, match="latent"):
        FinetuneConfig(latent="teacher")
    for bad in (1.0, -0.1, True, "half"):
        with pytest.raises(FinetuneError, match="latent_inset"):
            FinetuneConfig(latent_inset=bad)


def test_l4q_export_has_no_low_rank_part_and_reloads_to_the_fake_quant_model(teacher, student, tmp_path):
    model = fresh(student)
    layers = prepare_layers(model, "l4q", teacher, rank=4)
    params = trainable_tensors(layers)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        objective_loss(model, teacher, BLOCKS[2 * step : 2 * step + 2], "distill").backward()
        opt.step()
    trained = logits(model)
    plan = export_layers(model, layers, {})
    assert all(e["rank"] == 0 for e in plan.values())
    assert not any(k.endswith((".l1", ".l2")) for k in model.state_dict())
    assert torch.equal(logits(model), trained)
    save(model, tmp_path / "l4q", plan=plan)
    assert torch.equal(logits(load(tmp_path / "l4q")), trained)


@pytest.mark.parametrize("mode", ["lora", "peqa", "l4q", "lsq"])
def test_training_loss_decreases_on_a_learnable_objective(student, mode):
    """Next-token loss on a repeating sequence: each mode must learn some of it."""
    blocks = (torch.arange(16)[None, :] + torch.arange(14)[:, None]) % 6 + 10  # [14, 16]
    cfg = config(mode, objective="lm", steps=25, lr=1e-2, scale_lr=2e-3, batch_size=4, warmup=2)
    cfg = FinetuneConfig(**{**cfg.to_dict(), "eval_blocks": 2, "eval_every": 5, "patience": 0})
    report = finetune(fresh(student), None, config=cfg, blocks=blocks, progress=False)
    assert report.losses[0] - sum(report.losses[-3:]) / 3 > 0.3, report.losses
    assert report.evals[-1][1] < report.evals[0][1]


def test_resume_from_saved_state_continues_identically(teacher, student, tmp_path):
    cfg = config("lsq", steps=6, save_every=2, eval_blocks=2, eval_every=2, patience=3)
    a = fresh(student)
    report_a = finetune(a, teacher, config=cfg, blocks=BLOCKS, state_dir=tmp_path / "a", progress=False)

    class Stop(Exception):
        pass

    def stop_at_3(step, loss):
        if step == 3:
            raise Stop

    b = fresh(student)
    untouched = snapshot(b)
    with pytest.raises(Stop):
        finetune(b, teacher, config=cfg, blocks=BLOCKS, state_dir=tmp_path / "b", callback=stop_at_3)
    assert all(torch.equal(untouched[k], t) for k, t in snapshot(b).items())  # a failed run changes nothing
    report_b = finetune(b, teacher, config=cfg, blocks=BLOCKS, state_dir=tmp_path / "b", progress=False)
    assert report_b.start_step == 2 and report_b.steps == 6
    assert report_b.losses == report_a.losses and report_b.evals == report_a.evals
    final_a, final_b = snapshot(a), snapshot(b)
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    other = FinetuneConfig(**{**cfg.to_dict(), "lr": 0.5})
    with pytest.raises(FinetuneError, match="another config"):
        finetune(fresh(student), teacher, config=other, blocks=BLOCKS, state_dir=tmp_path / "b")
    with pytest.raises(FinetuneError, match="another data_sha256"):
        finetune(fresh(student), teacher, config=cfg, blocks=BLOCKS + 1, state_dir=tmp_path / "b")


def test_same_seed_gives_the_same_result_another_seed_does_not(teacher, student):
    runs = []
    for seed in (0, 0, 1):
        model = fresh(student)
        finetune(model, teacher, config=config("l4q", seed=seed), blocks=BLOCKS, progress=False)
        runs.append(snapshot(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_early_stop_restores_the_best_tensors(student):
    """Held-out blocks use tokens never trained on: learning the training text makes them worse."""
    blocks = (torch.arange(16)[None, :] + torch.arange(12)[:, None]) % 6 + 10  # [12, 16]
    blocks[-2:] += 90
    cfg = config("lora", objective="lm", steps=20, eval_blocks=2, eval_every=2, schedule="constant")
    cfg = FinetuneConfig(**{**cfg.to_dict(), "patience": 2})
    model = fresh(student)
    report = finetune(model, None, config=cfg, blocks=blocks, progress=False)
    assert report.stopped_early and report.steps < 20
    best = min(loss for _, loss in report.evals)
    assert report.evals[-1][1] > best and [s for s, loss in report.evals if loss == best] == [
        report.best_step
    ]
    assert report.steps == report.best_step + 2 * cfg.patience
    shorter = fresh(student)  # the same run, stopped at the best step
    finetune(
        shorter, None, config=FinetuneConfig(**{**cfg.to_dict(), "steps": report.best_step}), blocks=blocks
    )
    final, best_state = snapshot(model), snapshot(shorter)
    assert all(torch.equal(final[k], best_state[k]) for k in final)


def test_report_and_activation_checkpointing(teacher, student):
    model = fresh(student)
    seen = []
    report = finetune(
        model,
        teacher,
        config=config("lora", hidden_weight=1.0),
        blocks=BLOCKS,
        callback=lambda step, loss: seen.append(model.model.gradient_checkpointing),
        progress=False,
    )
    assert seen == [True] * 4 and not model.model.gradient_checkpointing
    assert report.objective == "distill" and len(report.losses) == 4
    assert report.peak_memory_bytes > 0 and report.seconds_per_step > 0
    ranked = [model.get_submodule(n) for n in qlinear_names(model) if model.get_submodule(n).rank]
    assert report.trained_layers == len(ranked)
    assert report.trainable_params == sum(m.l1.numel() + m.l2.numel() for m in ranked)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_hidden_state_term_adds_to_the_distillation_loss(teacher, student):
    model = fresh(student)
    with torch.no_grad():
        kl = objective_loss(model, teacher, BLOCKS[:2], "distill")
        both = objective_loss(model, teacher, BLOCKS[:2], "distill", hidden_weight=1.0)
        assert kl > 0 and both > kl
        assert objective_loss(teacher, teacher, BLOCKS[:2], "distill", hidden_weight=1.0) < 1e-6


def test_sampled_teacher_text_is_deterministic_and_trains(teacher, student):
    a, b = (sample_blocks(teacher, 3, 6, bos_id=1, seed=0) for _ in range(2))
    c = sample_blocks(teacher, 3, 6, bos_id=1, seed=1)
    assert a.shape == (3, 6) and (a[:, 0] == 1).all() and torch.equal(a, b) and not torch.equal(a, c)
    cfg = config("peqa", data="teacher", samples=4, seq_len=6, steps=2, eval_blocks=1)
    report = finetune(fresh(student), teacher, config=cfg, progress=False)
    assert report.objective == "distill" and report.steps == 2


def test_learning_rate_schedule_and_batches():
    warm = [lr_factor(s, 10, 3, "cosine") for s in range(10)]
    assert warm[:3] == [0.25, 0.5, 0.75] and warm[3] == 1.0
    assert all(x > y for x, y in zip(warm[3:], warm[4:], strict=False)) and warm[-1] > 0
    assert lr_factor(8, 10, 3, "constant") == 1.0
    assert math.isclose(lr_factor(6, 10, 2, "cosine"), 0.5 * (1 + math.cos(math.pi * 0.5)))
    stream = torch.cat([batch_indices(s, 5, 2, seed=3) for s in range(5)])  # two epochs
    assert sorted(stream[:5].tolist()) == list(range(5)) and sorted(stream[5:].tolist()) == list(range(5))
    assert torch.equal(batch_indices(4, 5, 2, seed=3), batch_indices(4, 5, 2, seed=3))


def test_bad_input_gives_clear_errors(teacher, student):
    with pytest.raises(FinetuneError, match="unknown finetune mode"):
        FinetuneConfig(mode="qat")
    with pytest.raises(FinetuneError, match="steps must be an integer >= 1"):
        FinetuneConfig(steps=0)
    with pytest.raises(FinetuneError, match="unknown finetune key"):
        FinetuneConfig.from_dict({"mode": "lora", "epochs": 3})
    assert FinetuneConfig.from_dict(config("l4q").to_dict()) == config("l4q")
    with pytest.raises(FinetuneError, match="needs the teacher"):
        finetune(fresh(student), None, config=config("lora"), blocks=BLOCKS)
    with pytest.raises(FinetuneError, match="no training data"):
        finetune(fresh(student), teacher, config=config("lora"))
    with pytest.raises(FinetuneError, match="every layer has rank 0"):
        finetune(compress(copy.deepcopy(teacher), ranks=[0]), teacher, config=config("lora"), blocks=BLOCKS)
    with pytest.raises(FinetuneError, match="no QLinear"):
        finetune(copy.deepcopy(teacher), teacher, config=config("peqa"), blocks=BLOCKS)
    with pytest.raises(FinetuneError, match="more than eval_blocks"):
        finetune(fresh(student), teacher, config=config("peqa", eval_blocks=12), blocks=BLOCKS)


def test_replace_weight_checks_what_it_is_given(student):
    m = copy.deepcopy(student.get_submodule("model.layers.0.self_attn.q_proj"))  # int4-g32, rank 0
    W = torch.randn(m.out_features, m.in_features)
    with pytest.raises(QLinearError, match="the layer is int4-g32"):
        m.replace_weight(quantize(W, QuantSpec("int3", 32)))
    with pytest.raises(QLinearError, match="do not fit"):
        m.replace_weight(quantize(W, m.spec), torch.zeros(3, 2), torch.zeros(2, 64))
    l1, l2 = torch.randn(m.out_features, 3), torch.randn(3, m.in_features)
    m.replace_weight(quantize(W, m.spec), l1, l2)
    assert m.rank == 3 and m.layer_plan()["rank"] == 3 and torch.equal(m.l1, l1)
    x = torch.randn(2, m.in_features)
    W_hat = dequantize(quantize(W, m.spec)) + l1 @ l2
    torch.testing.assert_close(m(x), x @ W_hat.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["lora", "lsq", "l4q"])
def test_bf16_model_trains_fp32_tensors_and_keeps_its_dtypes(teacher, mode):
    model = compress(copy.deepcopy(teacher).to(torch.bfloat16))
    dtypes = []
    report = finetune(
        model,
        None,
        config=config(mode, objective="lm", steps=2),
        blocks=BLOCKS,
        callback=lambda step, loss: dtypes.extend(p.dtype for p in model.parameters() if p.requires_grad),
        progress=False,
    )
    assert dtypes and set(dtypes) == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(e["rank"] == 0 for e in report.plan.values()) == (mode == "l4q")
    assert torch.isfinite(logits(model)).all()


def test_data_calibration_reads_the_jobs_calibration_text_or_its_tokens():
    """finetune data "calibration": the job's calibration text at fine-tuning's own samples and seq_len
    (so `--data` reaches fine-tuning too), or the given token blocks when the job was given tokens."""
    from lowbit.calibration.data import TOKENS_PREFIX
    from lowbit.compress.recipe import CalibrationConfig, Recipe
    from lowbit.compress.uniform import finetune_config

    ft = {"mode": "l4q", "data": "calibration", "samples": 64, "seq_len": 256}
    text = Recipe(finetune=ft, calibration=CalibrationConfig(data="builtin:bible"))
    config = finetune_config(text)
    assert (config.data, config.samples, config.seq_len) == ("builtin:bible", 64, 256)
    assert config.resolved_objective() == "distill"
    tokens = Recipe(finetune=ft, calibration=CalibrationConfig(data=f"{TOKENS_PREFIX}0123456789abcdef"))
    assert finetune_config(tokens).data is None
    other = Recipe(finetune={**ft, "data": "builtin:lee-news"})
    assert finetune_config(other).data == "builtin:lee-news"


@pytest.mark.parametrize("mode", ["peqa", "l4q", "lsq"])
def test_online_hadamard_layers_train_with_their_transform(teacher, mode, tmp_path):
    """QuaRot's online Hadamard before down_proj (rotate.online_down): the training form rotates its input
    as the QLinear does, so it starts at the compressed model, learns, and exports a layer that still
    rotates and computes what was trained."""
    rotated = copy.deepcopy(teacher)
    downs = {f"model.layers.{i}.mlp.down_proj" for i in range(len(rotated.model.layers))}
    assert sorted(rotate_down(rotated, seed=0, layers=downs)) == sorted(downs)
    student = compress(copy.deepcopy(rotated), ranks=[0])
    assert all(student.get_submodule(n).hadamard for n in downs)
    model = fresh(student)
    layers = prepare_layers(model, mode, rotated, rank=4)
    assert all(layers[n][1].hadamard for n in downs)
    start = logits(model)
    torch.testing.assert_close(start, logits(student), rtol=1e-4, atol=1e-4)
    opt = torch.optim.AdamW(trainable_tensors(layers).values(), lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        objective_loss(model, rotated, BLOCKS[2 * step : 2 * step + 2], "distill").backward()
        for n in downs:
            assert any(p.grad.abs().sum() > 0 for p in layers[n][1].parameters() if p.requires_grad), n
        opt.step()
    trained = logits(model)
    assert not torch.allclose(trained, start)
    plan = export_layers(model, layers, {})
    assert all(plan[n].get("hadamard") for n in downs)
    torch.testing.assert_close(logits(model), trained, rtol=1e-4, atol=1e-4)
    save(model, tmp_path / mode, plan=plan)
    torch.testing.assert_close(logits(load(tmp_path / mode)), trained, rtol=1e-4, atol=1e-4)
