"""Named recipes (`lowbit compress --preset NAME`) and `resolve_recipe`: a Recipe from a Recipe, a
preset name or a recipe file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lowbit.compress.recipe import (
    AllocateConfig,
    CalibrationConfig,
    DecomposeConfig,
    QuantizeConfig,
    Recipe,
    RecipeError,
    RotateConfig,
    ScalingConfig,
    load_recipe,
)


def _preset(fmt: str, group_size: int | None, method: str = "none", rank: int = 0, **quant) -> Recipe:
    return Recipe(
        quantize=QuantizeConfig(format=fmt, group_size=group_size, **quant),
        decompose=DecomposeConfig(method=method, rank=rank),
    )


# The int4 presets are symmetric (the W4A16 convention: GPTQ / AWQ checkpoints for vLLM, Q4_0 in
# llama.cpp), which every engine serves and transformers loads from compressed-tensors; int4-g128-asym
# keeps zero points (more accurate: docs/benchmarks.md, "Symmetric int4 presets"); lower bit widths keep
# the recipe's default, asymmetric, where a zero point matters more.
# Joint allocation of bits, group sizes and ranks (INT codes, ranks 0 or 8) under `--budget`; a grid
# small enough for a CPU (12 candidates per layer, LoRC errors weighted by the Fisher diagonal, measured
# with round-to-nearest; 16 calibration blocks), the chosen candidates then rounded by GPTQ.
ALLOCATE_INT = AllocateConfig(
    formats=("int",), bits=(2, 3, 4), group_sizes=(64, 128), ranks=(0, 8), rounding="nearest"
)
ALLOC_QUANTIZE = QuantizeConfig(rounding="gptq")
AWQ = ScalingConfig(method="awq")
# The budget recipe built on activation-aware scaling: AWQ scales searched for int3-g128 (quantize's spec)
# through the layers' Hessians and folded before the table; a low-bit grid with int3 at groups 32 / 64 and
# nf3; the table rescaled by probes on 3 blocks; the result checked against the best uniform spec.
ALLOC_AWQ = Recipe(
    quantize=QuantizeConfig(format="int3", group_size=128, rounding="gptq"),
    scaling=ScalingConfig(method="awq", objective="layers", clip=False),
    allocate=replace(ALLOCATE_INT, formats=("int", "nf3"), group_sizes=(32, 64, 128), probes=3, check=True),
    calibration=CalibrationConfig(samples=16),
    decompose=DecomposeConfig("lorc"),
)
# The same allocation on rotated weights instead of scaled ones (QuaRot's randomized Hadamard rotations of
# the residual stream and of each value head, folded into the weights, and an online Hadamard transform
# before down_proj): the best budget recipe measured for the lowbit target (docs/benchmarks.md, "The
# default budget recipe"). Engines other than lowbit have no online transform: they keep alloc-awq.
# Every candidate's scales are double-quantized (QLoRA's 8-bit scale codes, one fp32 factor per 256
# scales): half the bits of fp16 scales, which the allocation spends on smaller groups; on the built-in
# model 24.203 out of domain at 3.25 against 24.623 with fp16 scales, 17.342 at 4.25 (alloc-rot-nf4)
# against 17.572 (docs/benchmarks.md, "Double-quantized scales"); with zero points at the codes' width
# (checkpoint format 2) 23.934 and 17.307 ("Zero points at the codes' width"); with QuaRot's sign order
# and the allocated layers rounded on quantized inputs 24.485 and 17.800 (one draw each; "QuaRot's sign
# order, and quantized inputs for the allocated layers").
ALLOC_ROT = replace(
    ALLOC_AWQ,
    quantize=replace(ALLOC_AWQ.quantize, double_quant=True),
    scaling=replace(ALLOC_AWQ.scaling, method="none"),
    rotate=RotateConfig(method="hadamard", heads=True, online_down=True),
)
# From NF4_FROM bits per weight up, NF4 joins the grid (at groups 32, 64, 128): on the rotated weights its
# normal-quantile levels fit better than int4's evenly spaced ones. At 4.25 on the built-in model (fp16
# scales), 17.572 out of domain against 18.245 for alloc-rot (docs/benchmarks.md, "The rotation recipe").
# INT8 joins it too, and every layer of one type takes one spec (`allocate.tie: type`): the value
# projections go to 8 bits; at 4.25, 17.761 and 17.500 out of domain (seeds 0 and 1) against 17.800 and
# 17.973 with a spec per layer and no INT8 (docs/benchmarks.md, "One spec per layer type").
ALLOC_ROT_NF4 = replace(
    ALLOC_ROT,
    allocate=replace(ALLOC_ROT.allocate, formats=("int", "nf3", "nf4"), bits=(2, 3, 4, 8), tie="type"),
)
NF4_FROM = 4.0

# Below FINETUNE_BELOW bits per weight the allocation alone loses much (docs/benchmarks.md, "Fine-tuning the
# default budget recipe"): alloc-awq-ft adds L4Q fine-tuning, distilled from the original model on the
# calibration text (64 blocks of 256 tokens; batches of 2).
FINETUNE = {
    "mode": "l4q",
    "objective": "distill",
    "steps": 50,
    "batch_size": 2,
    "seq_len": 256,
    "data": "calibration",
    "samples": 64,
}
# alloc-rot-ft: l4q's latent starts halfway inside its cell (on the edge, the first step undid GPTQ's codes
# on rotated weights), and 100 steps (at 2.5 bits per weight with fp16 scales 46.908 out of domain against
# 48.886 at 50; with alloc-rot's double-quantized scales 43.842, and 44.919 with other seeds)
FINETUNE_ROT = {**FINETUNE, "steps": 100, "latent_inset": 0.5}
FINETUNE_BELOW = 3.0
# alloc-rot-nf4-ft: the same fine-tuning at a fifth of the learning rates. A 4-bit code's cell is about
# 3x narrower than at 2.5 bits, and at alloc-rot-ft's rates the held-out distillation loss never fell
# below its start (early stopping kept the untuned model). At 4.25 on the built-in model, out of domain:
# alloc-rot-nf4 17.761 -> 17.460 and, on other seeds, 17.500 -> 17.253; uniform nf4-g64 with 8-bit value
# projections 17.465 -> 17.305 and 17.584 -> 17.495 (docs/benchmarks.md, "Fine-tuning at 4 bits: a fifth
# of the learning rates"). The default from NF4_FROM bits per weight up, unless the model is streamed.
# Twice the steps and text (200 steps on 128 blocks, or 60 steps of 8 blocks) gain 0.2% to 0.5% more out
# of domain for about 1.6x the fine-tuning time, less than the draws' spread ("more steps, more text").
FINETUNE_NF4 = {**FINETUNE_ROT, "lr": 2e-5, "scale_lr": 2e-6}
BUDGET_PRESET, BUDGET_PRESET_FT = "alloc-rot", "alloc-rot-ft"
BUDGET_PRESET_NF4, BUDGET_PRESET_NF4_FT = "alloc-rot-nf4", "alloc-rot-nf4-ft"
ENGINE_PRESETS = ("alloc-awq", "alloc-awq-ft")  # the budget defaults for targets other than lowbit

PRESETS: dict[str, Recipe] = {
    "int8": _preset("int8", None, symmetric=True),
    "int4-g128": _preset("int4", 128, symmetric=True),
    "int4-g128-asym": _preset("int4", 128),
    "int4-g64": _preset("int4", 64, symmetric=True),
    "int3-g128": _preset("int3", 128),
    "int3-g64": _preset("int3", 64),
    "int2-g64": _preset("int2", 64),
    "nf4-g64": _preset("nf4", 64),
    "nf4-g64-dq": _preset("nf4", 64, double_quant=True),
    "nf3-g64": _preset("nf3", 64),
    "nf2-g64": _preset("nf2", 64),
    "fp8": _preset("fp8_e4m3", None),
    "fp8-e5m2": _preset("fp8_e5m2", None),
    "fp4-g32": _preset("fp4_e2m1", 32),
    # llama.cpp's K-quants, made for llama.cpp: where K is not a multiple of 256, llama-quantize's fallback
    # (q4_k: Q4_1, q6_k: Q8_0; lowbit.quantizers.engines.KQUANT_FALLBACK)
    "q4_k": replace(_preset("q4_k", 256), target="llama.cpp"),
    "q6_k": replace(_preset("q6_k", 256), target="llama.cpp"),
    "int4-g128-gptq": _preset("int4", 128, rounding="gptq", symmetric=True),
    "int3-g128-gptq": _preset("int3", 128, rounding="gptq"),
    "int4-g128-awq": replace(_preset("int4", 128, symmetric=True), scaling=AWQ),
    "int3-g128-awq": replace(_preset("int3", 128), scaling=AWQ),
    "int3-g128-lqlora-r32": _preset("int3", 128, "lqlora", 32),
    "int3-g128-lqlora-fisher-r32": _preset("int3", 128, "lqlora-fisher", 32),
    "int4-g128-svdquant-r32": _preset("int4", 128, "svdquant", 32, symmetric=True),
    "int3-g128-svdquant-r32": _preset("int3", 128, "svdquant", 32),
    "nf3-g64-lorc-r16": _preset("nf3", 64, "lorc", 16),
    "alloc-int": Recipe(
        quantize=ALLOC_QUANTIZE,
        allocate=ALLOCATE_INT,
        calibration=CalibrationConfig(samples=16),
        decompose=DecomposeConfig("lorc"),
    ),
    "alloc-awq": ALLOC_AWQ,
    "alloc-awq-ft": Recipe.from_dict({**ALLOC_AWQ.to_dict(), "finetune": FINETUNE}),  # the section completed
    "alloc-rot": ALLOC_ROT,
    "alloc-rot-ft": Recipe.from_dict({**ALLOC_ROT.to_dict(), "finetune": FINETUNE_ROT}),
    "alloc-rot-nf4": ALLOC_ROT_NF4,
    "alloc-rot-nf4-ft": Recipe.from_dict({**ALLOC_ROT_NF4.to_dict(), "finetune": FINETUNE_NF4}),
    "alloc-int-nf": Recipe(
        quantize=ALLOC_QUANTIZE,
        allocate=replace(ALLOCATE_INT, formats=("int", "nf")),
        calibration=CalibrationConfig(samples=16),
        decompose=DecomposeConfig("lorc"),
    ),
}


def preset(name: str) -> Recipe:
    if name not in PRESETS:
        raise RecipeError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def budget_preset(budgets: list[float], streamed: bool = False, target: str = "lowbit") -> str:
    """The default recipe of a budget job (`lowbit compress --budget B` or `compress(model, budget=B)` without
    a recipe): alloc-rot; alloc-rot-ft when a budget is below FINETUNE_BELOW; alloc-rot-nf4-ft when every
    budget is at least NF4_FROM. Fine-tuning holds the whole model and the original as its teacher, so a
    model streamed block by block (`streamed`: a local folder compressed into an output folder) is not
    fine-tuned (alloc-rot, alloc-rot-nf4). A checkpoint for another engine (`target`) takes alloc-awq (-ft)
    instead: they have no online Hadamard transform."""
    if target == "lowbit" and min(budgets) >= NF4_FROM:
        return BUDGET_PRESET_NF4 if streamed else BUDGET_PRESET_NF4_FT
    plain, tuned = (BUDGET_PRESET, BUDGET_PRESET_FT) if target == "lowbit" else ENGINE_PRESETS
    return tuned if min(budgets) < FINETUNE_BELOW and not streamed else plain


def resolve_recipe(
    recipe: Recipe | str | Path | None,
    budgets: list[float] | None = None,
    streamed: bool = False,
    target: str | None = None,
) -> Recipe:
    """A Recipe from a Recipe, a preset name, a recipe file path, or None: the default, int4-g128, or with
    budgets `budget_preset(budgets, streamed, target)`."""
    if recipe is None:
        return PRESETS[budget_preset(budgets, streamed, target or "lowbit") if budgets else "int4-g128"]
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str) and recipe in PRESETS:
        return preset(recipe)
    if isinstance(recipe, (str, Path)) and Path(recipe).suffix in (".yaml", ".yml", ".json"):
        return load_recipe(recipe)
    raise RecipeError(
        f"recipe must be a Recipe, a preset name ({', '.join(PRESETS)}) or a .yaml / .json file, "
        f"got {recipe!r}"
    )
