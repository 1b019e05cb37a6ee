"""GGUF exports run in llama.cpp: file size and held-out perplexity in lowbit and in llama.cpp.

Usage:
    OMP_NUM_THREADS=1 nice -n 10 python scripts/gguf_llama_cpp.py [--model smollm2-135m]
        [--presets int4-g128,q4_k] [--embeddings f32,auto] [--tokens 2048] [--work-dir DIR]
        [--json results.json]

For each preset: compress the model (round-to-nearest presets need no calibration), then for each token
embedding type (`lowbit export --to gguf --embedding`) export to GGUF and report the size of model.gguf,
the stored bits per weight of the quantized layers, the tensor types written, and perplexity on the first
--tokens held-out tokens of builtin:lee-news (windows of 512, every position scored) computed by lowbit
on the checkpoint and by llama.cpp (llama-cpp-python, CPU, extra buffer types off) on the export.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import torch

from lowbit.calibration.data import eval_tokens
from lowbit.compress.api import compress
from lowbit.export import export, stored_bits_per_weight
from lowbit.nn.checkpoint import load, load_tokenizer

WINDOW = 512


def nll_sum(logits: torch.Tensor, row: torch.Tensor) -> float:
    """Summed negative log-likelihood of row[1:] under logits [len(row), vocab] (float32)."""
    logp = torch.log_softmax(logits[:-1].float(), -1)
    return -float(logp.gather(1, row[1:, None]).sum())


def windows(ckpt: Path, tokens: int) -> torch.Tensor:
    """The first `tokens` held-out tokens of builtin:lee-news: [tokens / 512, 512]."""
    return eval_tokens(load_tokenizer(ckpt), "builtin:lee-news", tokens).view(-1, WINDOW)


def lowbit_perplexity(ckpt: Path, blocks: torch.Tensor) -> float:
    model = load(ckpt)
    with torch.no_grad():
        nll = sum(nll_sum(model(row[None]).logits[0], row) for row in blocks)
    return math.exp(nll / blocks.shape[0] / (WINDOW - 1))


def llama_cpp_perplexity(model_file: Path, blocks: torch.Tensor) -> float:
    llm = llama_cpp.Llama(
        str(model_file), n_ctx=WINDOW, logits_all=True, verbose=False, use_extra_bufts=False
    )
    nll = 0.0
    for row in blocks:
        llm.reset()
        llm.eval(row.tolist())
        nll += nll_sum(torch.from_numpy(np.array(llm.scores[:WINDOW], dtype=np.float32)), row)
    return math.exp(nll / blocks.shape[0] / (WINDOW - 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--presets", default="int4-g128,q4_k")
    p.add_argument("--embeddings", default="f32,auto")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--work-dir", help="keep checkpoints and exports here (default: a temporary folder)")
    p.add_argument("--json", help="write the rows to this file")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.work_dir or tmp)
        for preset in a.presets.split(","):
            ckpt = root / preset
            if not ckpt.exists():
                compress(a.model, preset, ckpt, progress=False)
            blocks = windows(ckpt, a.tokens)
            ppl_lowbit = lowbit_perplexity(ckpt, blocks)
            for embedding in a.embeddings.split(","):
                out = root / f"{preset}-gguf-{embedding}"
                report = export(ckpt, out, "gguf", embedding=embedding, overwrite=True)
                model_file = out / "model.gguf"
                tensors = gguf.GGUFReader(model_file).tensors
                types = Counter(t.tensor_type.name for t in tensors if len(t.shape) == 2)
                embed = next(t.tensor_type.name for t in tensors if t.name == "token_embd.weight")
                row = {
                    "preset": preset,
                    "embedding": f"{embedding} ({embed})",
                    "file_mb": model_file.stat().st_size / 1e6,
                    "bits_per_weight": stored_bits_per_weight(out, None),
                    "converted": report["converted"],
                    "types": dict(types),
                    "ppl_lowbit": ppl_lowbit,
                    "ppl_llama_cpp": llama_cpp_perplexity(model_file, blocks),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
