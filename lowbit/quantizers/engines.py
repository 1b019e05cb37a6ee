"""What each serving engine computes natively: the specs a layer may take when a checkpoint is made for
that engine (`lowbit compress --target`), read by the allocation's candidate mask, the uniform path's
per-layer group fallback and the exports' checks.

- `lowbit`: every spec (lowbit's own kernels and `lowbit.load`).
- `vllm` (compressed-tensors, served by vLLM's WNA16 / FP8 kernels): INT4 symmetric or asymmetric and
  INT8 symmetric, in groups of 32, 64 or 128 that divide the layer's input dimension K, or per channel;
  FP8 E4M3 per channel. vLLM fuses q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`, one
  matrix with one scheme, so the layers of such a group must share their spec (`fused_groups`).
- `llama.cpp` (GGUF, what lowbit writes exactly): Q4_0 (INT4 symmetric), Q4_1 (INT4 asymmetric) and Q8_0
  (INT8 symmetric), in groups of a multiple of 32 weights or per channel (a group of 32 j weights is j
  blocks repeating its scale and zero), K a multiple of 32; the K-quants Q4_K, Q5_K and Q6_K (lowbit's
  q4_k, q5_k, q6_k) where K is a multiple of their 256-weight super-block, elsewhere not a candidate, and a
  uniform recipe takes llama-quantize's fallback there (`served_group`). Each tensor has its own type.

No engine serves double-quantized scales. `ENGINES` is the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lowbit.quantizers.kquant import QK_K
from lowbit.quantizers.spec import QuantSpec

QK = 32  # weights per llama.cpp block of Q8_0 / Q4_0 / Q4_1
# llama-quantize's type for a tensor whose rows do not fit a K-quant's super-block (llama-quant.cpp: Q4_K ->
# Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), as the nearest type lowbit writes: Q4_1 for Q5_0, Q8_0 for Q5_1
KQUANT_FALLBACK = {
    "q4_k": QuantSpec("int4", QK),
    "q5_k": QuantSpec("int8", QK, True),
    "q6_k": QuantSpec("int8", QK, True),
}
VLLM_GROUPS = (32, 64, 128)  # the group sizes of vLLM's WNA16 kernels (Marlin), besides per channel
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def vllm_problem(spec: QuantSpec, in_features: int | None) -> str | None:
    """Why vLLM cannot serve W [N, K] of this spec natively, or None; in_features None: the format only."""
    if spec.double_quant:
        return "double-quantized scales are not served by vLLM"
    if spec.kind == "fp":
        if spec.format != "fp8_e4m3":
            return f"{spec.format} is not served by vLLM (FP8 E4M3 is)"
        return None if spec.group_size is None else "vLLM serves FP8 per channel only"
    if spec.kind != "int":
        return f"{spec.format} (a {spec.kind} codebook) is not served by vLLM"
    if spec.bits not in (4, 8):
        return f"{spec.format}: vLLM serves 4- and 8-bit integer weights only"
    if spec.bits == 8 and not spec.symmetric:
        return "asymmetric int8: vLLM serves 8-bit weights symmetric only"
    g = spec.group_size
    if g is not None and g not in VLLM_GROUPS:
        return f"group size {g}: vLLM serves groups of {', '.join(map(str, VLLM_GROUPS))} or per channel"
    if g is not None and in_features is not None and in_features % g:
        return f"group size {g} does not divide in_features {in_features}"
    return None


def llama_cpp_problem(spec: QuantSpec, in_features: int | None) -> str | None:
    """Why no llama.cpp type that lowbit writes exactly (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) holds W [N, K]
    of this spec, or None; in_features None: the format only."""
    if spec.format in KQUANT_FALLBACK:
        if in_features is not None and in_features % QK_K:
            return f"in_features {in_features} is not a multiple of {spec.format}'s super-block of {QK_K}"
        return None
    if spec.double_quant:
        return "double-quantized scales have no llama.cpp type"
    if spec.kind != "int" or spec.bits not in (4, 8):
        return (
            f"{spec.format} has no llama.cpp type (Q8_0, Q4_0 and Q4_1 hold INT8 and INT4, "
            "Q4_K / Q5_K / Q6_K lowbit's q4_k / q5_k / q6_k)"
        )
    if spec.bits == 8 and not spec.symmetric:
        return "asymmetric int8 has no llama.cpp type (Q8_0 is symmetric)"
    if spec.group_size is not None and spec.group_size % QK:
        return f"group size {spec.group_size} is not a multiple of llama.cpp's block of 32 weights"
    if in_features is not None and in_features % QK:
        return f"in_features {in_features} is not a multiple of llama.cpp's block of 32"
    return None


@dataclass(frozen=True)
class Engine:
    """A serving engine a checkpoint can be made for.

    problem(spec, in_features or None): why the engine cannot serve a layer of that spec, or None;
    None for an engine that serves every spec. fused: whether the layers of each `FUSED` group run as
    one matrix there, so that they must share one spec (and rank). The `lowbit export` target of vLLM is
    `compressed-tensors`, of llama.cpp `gguf`.
    """

    name: str
    problem: Callable[[QuantSpec, int | None], str | None] | None
    fused: bool


ENGINES: dict[str, Engine] = {
    "lowbit": Engine("lowbit", None, False),
    "vllm": Engine("vLLM", vllm_problem, True),
    "llama.cpp": Engine("llama.cpp", llama_cpp_problem, False),
}


def served_group(engine: str, spec: QuantSpec, in_features: int) -> QuantSpec:
    """`spec` with the group size the engine serves on a layer of `in_features` inputs: unchanged when it
    serves it, else the largest served group below it that divides K, else per channel (the fallback a
    uniform recipe takes per layer, e.g. g128 on K = 576 -> g64). Only the group changes, except for a
    K-quant on llama.cpp where K is not a multiple of 256: llama-quantize's fallback (KQUANT_FALLBACK)."""
    problem = ENGINES[engine].problem
    if problem is None or problem(spec, in_features) is None or spec.group_size is None:
        return spec
    if engine == "llama.cpp" and spec.format in KQUANT_FALLBACK:
        return KQUANT_FALLBACK[spec.format]
    for g in range(spec.group_size - 8, 0, -8):  # group sizes are multiples of 8
        candidate = QuantSpec(spec.format, g, spec.symmetric, spec.scale_dtype, spec.double_quant)
        if in_features % g == 0 and problem(candidate, in_features) is None:
            return candidate
    return QuantSpec(spec.format, None, spec.symmetric, spec.scale_dtype, spec.double_quant)


def fused_groups(names) -> list[list[str]]:
    """The layers among `names` that an engine fusing q/k/v and gate/up runs as one matrix: for each
    parent module, its FUSED members present (two or more), in the order of `names`."""
    groups: dict[tuple[str, str], list[str]] = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        fused = next((f for f, members in FUSED.items() if leaf in members), None)
        if fused is not None:
            groups.setdefault((parent, fused), []).append(n)
    return [g for g in groups.values() if len(g) > 1]
