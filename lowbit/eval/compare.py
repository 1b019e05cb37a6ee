"""The original model, the checkpoints a compress run wrote and round-to-nearest baselines of similar
size, evaluated side by side on held-out texts (`lowbit compress --eval`, `--eval-data`)."""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.compress.api import compress
from lowbit.compress.memory import release_freed_memory
from lowbit.compress.presets import preset
from lowbit.compress.report import write_report
from lowbit.eval import evaluate
from lowbit.eval.baselines import RTN_BASELINES, nearest_baseline


def compare(
    model: str,
    result: dict,
    texts: list[str],
    baselines: list[tuple[int, int]] | None,
    *,
    tokens: int | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity on each of `texts` of the original `model`, of every checkpoint of a compress `result`
    (its report as a dict) and, unless baselines is None, of round-to-nearest baselines (the one nearest in
    size to the quantized layers' shapes `baselines`, or all of them for several budgets), each baseline
    compressed once. The first text's numbers are returned at the top level (`original`, `compressed`,
    `rtn`; several budgets: `points`, with report.json + pareto.png beside them), every text's under
    "eval": [{"data", ...}]."""
    run = {"progress": progress, "device": device}
    budgets = result.get("budgets") or [{"out": result["out"], "budget": None}]
    # per text: the original, each budget's checkpoint (in budgets' order), each baseline by name
    on = {
        d: {
            "original": _evaluated(model, d, tokens, dtype=dtype, **run),
            "checkpoints": [_evaluated(b["out"], d, tokens, **run) for b in budgets],
            "rtn": {},
        }
        for d in texts
    }
    if baselines is None:
        wanted = []
    elif len(budgets) > 1:
        wanted = RTN_BASELINES
    else:
        wanted = [nearest_baseline(result["bits_per_weight"], baselines)]
    for name in wanted:  # one baseline in memory at a time, evaluated on every text
        rtn_model, _ = compress(model, preset(name), dtype=dtype, **run)
        for d in texts:
            on[d]["rtn"][name] = evaluate(model, d, tokens, model=rtn_model, **run)
        del rtn_model
        release_freed_memory()
    if len(budgets) == 1:
        each = [
            {"original": e["original"], "compressed": e["checkpoints"][0], "rtn": e["rtn"]}
            for e in on.values()
        ]
        return {**each[0], "eval": [{"data": d, **e} for d, e in zip(texts, each, strict=True)]}
    each = [_points(budgets, **e) for e in on.values()]
    files = write_report(Path(result["out"]), each[0], {"model": model, "data": texts[0]})
    return {
        "points": each[0],
        "report": [str(f) for f in files],
        "eval": [{"data": d, "points": p} for d, p in zip(texts, each, strict=True)],
    }


def _evaluated(*args, **kwargs) -> dict:
    """`evaluate`, then the memory of the model it loaded (freed on return) handed back to the system
    before the next model is loaded (`lowbit.compress.memory.release_freed_memory`)."""
    result = evaluate(*args, **kwargs)
    release_freed_memory()
    return result


def _points(budgets: list[dict], original: dict, checkpoints: list[dict], rtn: dict) -> list[dict]:
    """One text's points for the Pareto report: the original, each budget's checkpoint, each baseline."""
    points = [{"label": "original", "kind": "original", **original}]
    points += [
        {"label": f"budget {b['budget']:g}", "kind": "budget", **c}
        for b, c in zip(budgets, checkpoints, strict=True)
    ]
    return points + [{"label": name, "kind": "rtn", **r} for name, r in rtn.items()]
