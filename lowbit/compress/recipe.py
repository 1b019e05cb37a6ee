"""Recipes: what to do to a model, as frozen dataclasses serialised to versioned YAML/JSON.

A recipe file looks like this (every key optional; defaults shown)::

    version: 1
    quantize:            # rounding: nearest | gptq | gptq-noclip | gptq-plain
      {format: int4, group_size: 128, symmetric: false, scale_dtype: float16, double_quant: false,
       rounding: nearest}
    decompose:           # method: none | lorc | lqlora | lqlora-fisher | svdquant
      {method: none, rank: 0, iterations: 20}
    calibration: {data: "builtin:lee-news", samples: 128, seq_len: 512, seed: 0}
    scaling:             # activation-aware scaling before rounding (lowbit.compress.awq); method: none | awq
      {method: none, objective: block, grid: 20, samples: 8, clip: true, clip_grid: 20, clip_max_shrink: 0.5}
    allocate:            # per-layer format / bits / group / rank by ILP under `budget` bits per weight
      {budget: null, formats: [int, nf], bits: [2, 3, 4, 8], group_sizes: [32, 64, 128],
       ranks: [0, 8, 16, 32, 64], metric: fisher, rounding: null, solver: ilp,
       pins: {}, forbid: [], min_bits: {}, probes: 0, check: false,
       propagate: quantized, tie: none}  # e.g. min_bits: {"*.down_proj": 4}
    rotate:              # incoherence processing (lowbit.compress.rotation); method: none | hadamard
      {method: none, seed: 0, residual: true, heads: false, online_down: false}
    finetune:            # optional: lora | peqa | l4q | lsq, lm or distill (see lowbit.compress.finetune)
      {mode: lora, objective: distill, steps: 100}
    target: lowbit       # the engine that serves it: lowbit | vllm | llama.cpp (lowbit.quantizers.engines)
    exclude: ["lm_head"] # fnmatch patterns of layers left as they are
    overrides:           # per-layer quantize settings, first match wins
      - {match: "*.down_proj", quantize: {format: int8}}

`PRESETS` names the common recipes (`--preset int4-g128`).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from lowbit.calibration.sequential import PROPAGATE
from lowbit.compress.allocate.candidates import candidate_grid
from lowbit.compress.allocate.constraints import TIES
from lowbit.compress.allocate.solve import SOLVERS
from lowbit.compress.allocate.table import METRICS
from lowbit.lowrank import METHODS, ROUNDINGS, uses_gptq
from lowbit.nn.manifest import CheckpointError
from lowbit.nn.shards import parse_size
from lowbit.quantizers import SCALE_DTYPES, QuantSpec, SpecError
from lowbit.quantizers.engines import ENGINES

RECIPE_VERSION = 1
DECOMPOSE_METHODS = tuple(METHODS)
SCALING_METHODS = ("none", "awq")
SCALING_OBJECTIVES = ("block", "layers")
ROTATE_METHODS = ("none", "hadamard")


class RecipeError(ValueError):
    """A recipe that cannot be used: unknown key, unknown preset, bad value."""


@dataclass(frozen=True)
class QuantizeConfig:
    """The weight format of quantized layers and how codes are rounded (nearest or GPTQ)."""

    format: str = "int4"
    group_size: int | None = 128
    symmetric: bool = False
    scale_dtype: str = "float16"
    double_quant: bool = False
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise RecipeError(f"unknown rounding {self.rounding!r}; choose one of {', '.join(ROUNDINGS)}")
        self.spec()  # validates format, group size and scale dtype

    def spec(self) -> QuantSpec:
        try:
            return QuantSpec(
                format=self.format,
                group_size=self.group_size,
                symmetric=self.symmetric,
                scale_dtype=self.scale_dtype,
                double_quant=self.double_quant,
            )
        except SpecError as e:
            raise RecipeError(str(e)) from None


@dataclass(frozen=True)
class DecomposeConfig:
    """W ~ Q + L1 L2: which decomposition, its rank, the LQ-LoRA iteration cap and the storage dtype of
    the low-rank factors (float16 by default: half the bits of fp32 at no measurable cost)."""

    method: str = "none"
    rank: int = 0
    iterations: int = 20
    lowrank_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.method not in DECOMPOSE_METHODS:
            raise RecipeError(
                f"unknown decompose method {self.method!r}; choose one of {', '.join(DECOMPOSE_METHODS)}"
            )
        if self.rank < 0 or self.iterations < 1:
            raise RecipeError("decompose.rank must be >= 0 and decompose.iterations >= 1")
        if self.lowrank_dtype not in SCALE_DTYPES:
            raise RecipeError(
                f"unknown decompose.lowrank_dtype {self.lowrank_dtype!r}; known: {', '.join(SCALE_DTYPES)}"
            )
        if self.method == "none" and self.rank:
            raise RecipeError("decompose.rank > 0 needs a decompose.method (lorc, lqlora, ...)")


@dataclass(frozen=True)
class CalibrationConfig:
    """Which text calibrates the model and how much of it.

    max_hidden_memory: bytes (or a size such as "4GB") of the hidden states between two decoder blocks
    kept in memory; the rest go to disk and are read back one micro-batch at a time, with the same
    result bit for bit (`lowbit.calibration.hidden`). None keeps them all in memory. Like every recipe
    key it is part of a work area's key: a killed job resumes with the same value.
    """

    data: str = "builtin:lee-news"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    max_hidden_memory: int | None = None

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seq_len < 2:
            raise RecipeError("calibration.samples must be >= 1 and calibration.seq_len >= 2")
        limit = self.max_hidden_memory
        if isinstance(limit, str):
            try:
                limit = parse_size(limit, "calibration.max_hidden_memory")
            except CheckpointError as e:
                raise RecipeError(str(e)) from None
            object.__setattr__(self, "max_hidden_memory", limit)  # stored as bytes
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise RecipeError(f"calibration.max_hidden_memory must be a size in bytes >= 0, got {limit!r}")


@dataclass(frozen=True)
class ScalingConfig:
    """Activation-aware scaling (AWQ, `lowbit.compress.awq`): what the exponent search minimises (the
    decoder block's output error on `samples` calibration sequences, or the layers' output error through
    their input Hessian), its grid, and the clipping search (ratios 1 - i / clip_grid down to
    1 - clip_max_shrink)."""

    method: str = "none"
    objective: str = "block"
    grid: int = 20
    samples: int = 8
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5

    def __post_init__(self) -> None:
        for key, known in (("method", SCALING_METHODS), ("objective", SCALING_OBJECTIVES)):
            if (value := getattr(self, key)) not in known:
                raise RecipeError(f"unknown scaling.{key} {value!r}; choose one of {', '.join(known)}")
        if self.grid < 1 or self.samples < 1 or self.clip_grid < 1 or not 0 <= self.clip_max_shrink < 1:
            raise RecipeError("scaling needs grid, samples, clip_grid >= 1 and 0 <= clip_max_shrink < 1")


@dataclass(frozen=True)
class RotateConfig:
    """Incoherence processing (QuaRot, `lowbit.compress.rotation`), folded into the float model before any
    statistics, with randomized Hadamard matrices from `seed` (method "hadamard"): residual, the residual
    stream (the norms' weights absorbed into their readers first); heads: each value head (v_proj /
    o_proj); online_down: down_proj's input, by a Hadamard transform applied at run time (the
    checkpoint's layer says "hadamard": true; exports other than dense refuse it)."""

    method: str = "none"
    seed: int = 0
    residual: bool = True
    heads: bool = False
    online_down: bool = False

    def __post_init__(self) -> None:
        if self.method not in ROTATE_METHODS:
            known = ", ".join(ROTATE_METHODS)
            raise RecipeError(f"unknown rotate.method {self.method!r}; choose one of {known}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise RecipeError(f"rotate.seed must be a non-negative integer, got {self.seed!r}")
        for key in ("residual", "heads", "online_down"):
            if not isinstance(getattr(self, key), bool):
                raise RecipeError(f"rotate.{key} must be true or false, got {getattr(self, key)!r}")
        if self.method == "none" and (self.heads or self.online_down):
            raise RecipeError("rotate.heads and rotate.online_down need rotate.method hadamard")
        if self.method != "none" and not (self.residual or self.heads or self.online_down):
            raise RecipeError("rotate.method hadamard needs one of rotate.residual, heads or online_down")


@dataclass(frozen=True)
class AllocateConfig:
    """Bit allocation (LQ-LoRA's ILP, with ranks): the candidate grid, the error metric and the budget.

    budget: average stored bits per quantized weight (codes, scales, zeros, low-rank counted); None
    means no allocation: every layer takes the recipe's quantize / decompose settings.
    pins: {layer pattern: {format / bits / group_size / rank: value}} restricts matching layers to the
    candidates with those values; forbid: [{match: pattern, bits / format / group_size / rank: value}]
    removes candidates; min_bits: {layer pattern: bits}. group_sizes may hold None (per-channel);
    symmetric: the INT variants in the grid (False: zero points; True: none, fewer bits), empty: quantize's.
    metric: what the ILP adds up over layers. "fisher" (default) weights each weight's squared error by
    the diagonal empirical Fisher, a second-order estimate of the loss increase (LQ-LoRA sec. 3.3) that is
    comparable between layers; "output" (the input-Hessian output error of GPTQ) is not: early layers
    see small activations and look cheap to damage, and on the built-in model at 3.25 bits per weight the
    allocation it picks scores perplexity 1392 where "fisher" scores 122 (round to nearest, both).
    rounding: how the error table is measured, None meaning quantize.rounding. "nearest" with a GPTQ
    recipe measures the table ~10x faster on a CPU; the chosen candidates are still rounded by GPTQ.
    probes: decoder blocks per spec whose measured calibration-loss change rescales that spec's column of
    the table (`lowbit.compress.probes`; 0: the table as measured). penalties: multipliers of the errors
    of the candidates with fewer bits than quantize's format; per budget the plan of each (and of 1) is
    measured by its calibration loss, rounded to nearest, and the best kept (`lowbit.compress.probes`,
    "Penalty search"; empty: the ILP's plan). check: compare the allocated model's
    calibration loss with the best uniform spec's at no more bits and keep the uniform plan when it wins.
    propagate: what the allocated layers' statistics are collected on. "quantized" (default): each plan
    (one per budget, and the check's uniform plan) is built block by block with the blocks before it
    already quantized to that plan, so each layer's GPTQ sees the errors of the layers before it (GPTQ's
    sequential protocol, as a uniform recipe is built); "original": the float model's inputs, every plan
    in one pass, and several processes build windows of as many blocks as processes (faster; uniform
    GPTQ nf4-g64 on the built-in model reads 0.8% higher out of domain and 2.1% in domain this way:
    docs/benchmarks.md, "QuaRot's sign order, and quantized inputs for the allocated layers"). SVDQuant's
    shared smoothing, folded into the norms, is always built on the float inputs.
    tie: "none" (default): every layer takes its own candidate; "type": every layer of one type (its name
    without the block number, `lowbit.compress.allocate.layer_type`) takes the same one, so the ILP
    chooses a spec per type (v_proj, down_proj, ...) with the type's errors and sizes summed: fewer
    choices fitted to the calibration text.
    With a `scaling` section the AWQ scales are searched once, for quantize's spec, and folded before the
    table is measured, so every candidate is measured on the scaled weights.
    """

    budget: float | None = None
    formats: tuple[str, ...] = ("int", "nf")
    bits: tuple[int, ...] = (2, 3, 4, 8)
    group_sizes: tuple[int, ...] = (32, 64, 128)
    ranks: tuple[int, ...] = (0, 8, 16, 32, 64)
    symmetric: tuple[bool, ...] = ()
    metric: str = "fisher"
    rounding: str | None = None
    solver: str = "ilp"
    pins: dict = field(default_factory=dict)
    forbid: tuple = ()
    min_bits: dict = field(default_factory=dict)
    probes: int = 0
    penalties: tuple[float, ...] = ()
    check: bool = False
    propagate: str = "quantized"
    tie: str = "none"

    def __post_init__(self) -> None:
        for name in ("formats", "bits", "group_sizes", "ranks", "symmetric", "penalties", "forbid"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.metric not in METRICS:
            raise RecipeError(f"unknown allocate.metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.rounding not in (None, *ROUNDINGS):
            raise RecipeError(
                f"unknown allocate.rounding {self.rounding!r}; choose one of {', '.join(ROUNDINGS)}"
            )
        if self.solver not in SOLVERS:
            raise RecipeError(f"unknown allocate.solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        if self.budget is not None and not self.budget > 0:
            raise RecipeError(
                f"allocate.budget must be a positive number of bits per weight, got {self.budget}"
            )
        if self.propagate not in PROPAGATE:
            raise RecipeError(
                f"unknown allocate.propagate {self.propagate!r}; choose one of {', '.join(PROPAGATE)}"
            )
        if self.tie not in TIES:
            raise RecipeError(f"unknown allocate.tie {self.tie!r}; choose one of {', '.join(TIES)}")
        if self.probes < 0:
            raise RecipeError(f"allocate.probes must be >= 0, got {self.probes}")
        if not all(isinstance(p, (int, float)) and p >= 1 for p in self.penalties):
            raise RecipeError(f"allocate.penalties must be numbers >= 1, got {list(self.penalties)}")
        if not (self.formats and self.bits and self.group_sizes and self.ranks):
            raise RecipeError("allocate needs at least one format, bit width, group size and rank")

    def __hash__(self) -> int:
        return hash(json.dumps(asdict(self), sort_keys=True, default=str))


@dataclass(frozen=True)
class Override:
    """Quantize settings for the layers whose fully qualified name matches `match` (fnmatch)."""

    match: str
    quantize: QuantizeConfig


@dataclass(frozen=True)
class Recipe:
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    allocate: AllocateConfig = field(default_factory=AllocateConfig)
    finetune: dict | None = None
    exclude: tuple[str, ...] = ("lm_head",)
    overrides: tuple[Override, ...] = ()
    version: int = RECIPE_VERSION
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    target: str = "lowbit"
    rotate: RotateConfig = field(default_factory=RotateConfig)

    def __post_init__(self) -> None:
        self.check_target()
        if self.scaling.method != "none" and self.scaling.clip and self.allocate.budget is not None:
            raise RecipeError("scaling with a budget needs scaling.clip false (the clip depends on the spec)")
        if self.allocate.check and METHODS[self.decompose.method].shares_smoothing:
            raise RecipeError("allocate.check cannot compare plans that fold SVDQuant smoothing into norms")
        if self.scaling.method != "none" and self.scaling.clip and self.decompose.rank:
            raise RecipeError("scaling.clip needs decompose.rank 0: the low-rank part keeps what it cuts")
        if self.rotate.online_down and self.target != "lowbit":
            raise RecipeError(
                f"target {self.target} has no online Hadamard transform: set rotate.online_down false"
            )

    def check_target(self) -> None:
        """Refuse a recipe whose formats the target engine does not serve at any group size: the
        quantize spec and overrides, or, with a budget, every format of the candidate grid."""
        if self.target not in ENGINES:
            raise RecipeError(f"unknown target {self.target!r}; choose one of {', '.join(ENGINES)}")
        problem = ENGINES[self.target].problem
        if problem is None:
            return
        cfgs = [self.quantize, *(o.quantize for o in self.overrides)]
        if self.allocate.budget is None:
            for spec in (replace(c.spec(), group_size=None) for c in cfgs):
                if problem(spec, None):
                    raise RecipeError(f"target {self.target}: {problem(spec, None)}")
            return
        a = self.allocate
        base = self.quantize.spec()
        grid = candidate_grid(a.formats, a.bits, (None,), (0,), base=base, symmetric=a.symmetric)
        grid = [c.spec for c in grid]
        if all(problem(spec, None) for spec in grid):
            raise RecipeError(f"target {self.target} serves none of the candidates: {problem(grid[0], None)}")

    def needs_calibration(self) -> bool:
        """True when some stage reads calibration statistics (GPTQ, SVDQuant, Fisher weights)."""
        roundings = {self.quantize.rounding} | {o.quantize.rounding for o in self.overrides}
        allocating = self.allocate.budget is not None and self.allocate.metric != "frobenius"
        stats = bool(METHODS[self.decompose.method].needs) or self.scaling.method != "none"
        return any(uses_gptq(r) for r in roundings) or stats or allocating

    def layer_config(self, name: str) -> QuantizeConfig | None:
        """The quantize settings for one linear layer, or None when the layer stays as it is."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return None
        for o in self.overrides:
            if fnmatch.fnmatchcase(name, o.match):
                return o.quantize
        return self.quantize

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        d["allocate"] = json.loads(json.dumps(d["allocate"]))  # tuples -> lists
        d["overrides"] = [{"match": o.match, "quantize": asdict(o.quantize)} for o in self.overrides]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        if not isinstance(d, dict):
            raise RecipeError("a recipe must be a mapping of sections (quantize, decompose, ...)")
        _check_keys(d, cls, "recipe")
        version = d.get("version", RECIPE_VERSION)
        if version > RECIPE_VERSION:
            raise RecipeError(
                f"recipe version {version} is newer than this lowbit (supports {RECIPE_VERSION})"
            )
        base = cls()
        quantize = _section(QuantizeConfig, d.get("quantize"), "quantize", base.quantize)
        overrides = []
        for o in d.get("overrides") or ():
            if not isinstance(o, dict) or set(o) != {"match", "quantize"}:
                raise RecipeError("each override needs exactly the keys 'match' and 'quantize'")
            overrides.append(
                Override(str(o["match"]), _section(QuantizeConfig, o["quantize"], "override", quantize))
            )
        return cls(
            quantize=quantize,
            decompose=_section(DecomposeConfig, d.get("decompose"), "decompose", base.decompose),
            calibration=_section(CalibrationConfig, d.get("calibration"), "calibration", base.calibration),
            scaling=_section(ScalingConfig, d.get("scaling"), "scaling", base.scaling),
            allocate=_section(AllocateConfig, d.get("allocate"), "allocate", base.allocate),
            rotate=_section(RotateConfig, d.get("rotate"), "rotate", base.rotate),
            finetune=_finetune_section(d.get("finetune")),
            exclude=tuple(d.get("exclude", base.exclude)),
            overrides=tuple(overrides),
            version=version,
            target=d.get("target", base.target),
        )


def _finetune_section(d: dict | None) -> dict | None:
    """The finetune section, validated by FinetuneConfig (kept as a dict: the config lives with the stage)."""
    if d is None:
        return None
    from lowbit.compress.finetune import FinetuneConfig

    if not isinstance(d, dict):
        raise RecipeError("recipe section 'finetune' must be a mapping")
    try:
        return FinetuneConfig.from_dict(d).to_dict()
    except (TypeError, ValueError) as e:
        raise RecipeError(f"bad value in finetune: {e}") from None


def _check_keys(d: dict, cls: type, where: str) -> None:
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise RecipeError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))}")


def _section(cls: type, d: dict | None, where: str, base):
    if d is None:
        return base
    if not isinstance(d, dict):
        raise RecipeError(f"recipe section {where!r} must be a mapping")
    _check_keys(d, cls, where)
    try:
        return replace(base, **d)
    except (TypeError, SpecError) as e:
        raise RecipeError(f"bad value in {where}: {e}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe from a .yaml/.yml/.json file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        text = path.read_text()
        d = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise RecipeError(f"cannot parse recipe {path}: {str(e).splitlines()[0]}") from None
    return Recipe.from_dict(d or {})


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    path = Path(path)
    d = recipe.to_dict()
    path.write_text(json.dumps(d, indent=2) if path.suffix == ".json" else yaml.safe_dump(d, sort_keys=False))
