"""The model card (README.md) written into every checkpoint: where the model came from, how it was
compressed, its exact bits per weight and how to load it. The manifest lists and hashes it like every
other file, so a hub page shows what the checkpoint holds."""

from __future__ import annotations

import json
from collections import Counter

from lowbit.quantizers import QuantSpec

CARD = "README.md"


def model_card(source: str, plan: dict, recipe: dict | None, bits_per_weight: float) -> str:
    """Markdown for a checkpoint compressed from `source` with `recipe`, its layers per `plan`."""
    specs = Counter(QuantSpec.from_dict(e["spec"]).short() for e in plan.values())
    ranks = Counter(e["rank"] for e in plan.values())
    spec_lines = "\n".join(f"| {s} | {n} |" for s, n in sorted(specs.items()))
    rank_text = ", ".join(f"rank {r}: {n}" for r, n in sorted(ranks.items()))
    recipe_text = json.dumps(recipe, indent=2, sort_keys=True) if recipe is not None else "null"
    return f"""---
library_name: lowbit
tags: [lowbit, quantized]
---

# {source}, compressed with lowbit

- source model: `{source}`
- quantized layers: {len(plan)}, {bits_per_weight:.3f} bits per weight (codes, scales, zero points and
  low-rank factors counted exactly)
- low-rank parts: {rank_text or "none"}

| scheme | layers |
|---|---|
{spec_lines}

## Load

```python
import lowbit
model = lowbit.load("path/to/this/folder")
```

or, after `import lowbit`, `transformers.AutoModelForCausalLM.from_pretrained("path/to/this/folder")`.
Without lowbit imported, transformers refuses this folder instead of loading random weights.
`lowbit eval path/to/this/folder` measures its perplexity; `lowbit info` lists every layer.

## Recipe

```json
{recipe_text}
```
"""
