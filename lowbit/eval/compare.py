"""The original model, the checkpoints a compress run wrote and round-to-nearest baselines of similar
size, evaluated side by side on one held-out text (`lowbit compress --eval`)."""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.compress.api import compress
from lowbit.compress.presets import preset
from lowbit.compress.report import write_report
from lowbit.eval import evaluate
from lowbit.eval.baselines import RTN_BASELINES, nearest_baseline


def compare(
    model: str,
    result: dict,
    data: str,
    baselines: list[tuple[int, int]] | None,
    *,
    tokens: int | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity of the original `model`, of every checkpoint of a compress `result` (its report as a
    dict) and, unless baselines is None, of round-to-nearest baselines (the one nearest in size to the
    quantized layers' shapes `baselines`, or all of them for several budgets); several budgets also get
    report.json + pareto.png beside them."""
    run = {"progress": progress, "device": device}
    evaluated = {"original": evaluate(model, data, tokens, dtype=dtype, **run)}
    budgets = result.get("budgets") or [{"out": result["out"], "budget": None}]
    for b in budgets:
        evaluated[b["out"]] = evaluate(b["out"], data, tokens, **run)
    if baselines is None:
        wanted = []
    elif len(budgets) > 1:
        wanted = RTN_BASELINES
    else:
        wanted = [nearest_baseline(result["bits_per_weight"], baselines)]
    rtn = {}
    for name in wanted:
        rtn_model, _ = compress(model, preset(name), dtype=dtype, **run)
        rtn[name] = evaluate(model, data, tokens, model=rtn_model, **run)
    if len(budgets) == 1:
        return {"original": evaluated["original"], "compressed": evaluated[result["out"]], "rtn": rtn}
    points = [{"label": "original", "kind": "original", **evaluated["original"]}]
    points += [{"label": f"budget {b['budget']:g}", "kind": "budget", **evaluated[b["out"]]} for b in budgets]
    points += [{"label": name, "kind": "rtn", **r} for name, r in rtn.items()]
    files = write_report(Path(result["out"]), points, {"model": model, "data": data})
    return {"points": points, "report": [str(f) for f in files]}
