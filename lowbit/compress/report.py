"""The Pareto report of a multi-budget compress run: perplexity against bits per weight.

`report.json` holds every point (one per budget, plus the round-to-nearest uniform-spec baselines and
the original model); `pareto.png` plots them, when matplotlib is installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_report(folder: Path, points: list[dict], meta: dict) -> list[Path]:
    """Write report.json (and pareto.png when matplotlib is available) into `folder`; return the paths.

    points: dicts with `label`, `kind` ("budget", "rtn" or "original"), `bits_per_weight`, `perplexity`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "report.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**meta, "points": points}, indent=2) + "\n")
    os.replace(tmp, path)
    written = [path]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"budget": ("o-", "lowbit ILP allocation"), "rtn": ("s--", "round-to-nearest, uniform spec")}
    for kind, (style, label) in styles.items():
        pts = sorted((p["bits_per_weight"], p["perplexity"]) for p in points if p["kind"] == kind)
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=label)
    for p in points:
        if p["kind"] == "original":
            ax.axhline(p["perplexity"], color="grey", lw=0.8, label=f"original ({p['label']})")
    ax.set_xlabel("bits per weight (codes, scales, zeros, low-rank)")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title(meta.get("model", ""))
    ax.legend()
    ax.grid(alpha=0.3)
    png = folder / "pareto.png"
    fig.tight_layout()
    fig.savefig(png.with_name("pareto.tmp.png"), dpi=120)
    plt.close(fig)
    os.replace(png.with_name("pareto.tmp.png"), png)
    return [*written, png]
