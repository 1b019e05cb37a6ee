"""Recompute or store? The cost of a decoder block's calibration statistics in the budget path's second
pass (`lowbit.compress.budget_passes`), against keeping them on disk from the first pass.

Usage:
    OMP_NUM_THREADS=1 nice -n 10 python scripts/bench_budget_stats.py --shape 0.5b [--samples 16]
        [--seq-len 512] [--dir /tmp/lowbit-stats] [--json]

One decoder block of a `scripts/bench_scale.py` shape with random weights (bf16) runs on random hidden
states [samples, seq_len, hidden]: the time of its statistics run (the block's forward with one fp32
Hessian per distinct input, as `calibrate_sequential` collects them), of writing those Hessians to a
safetensors file and reading them back, and of GPTQ (int4, group 128) on the block's seven layers, for
scale; with the Hessians' bytes per block and over all blocks, against the model's bf16 size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import SHAPES, llama_config  # noqa: E402

from lowbit.calibration.sequential import BlockInputs, _run_block  # noqa: E402
from lowbit.quantizers import QuantSpec  # noqa: E402
from lowbit.quantizers.gptq import gptq  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/lowbit-stats"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from transformers import LlamaForCausalLM

    config = llama_config(args.shape, torch.bfloat16, layers=1)
    config.vocab_size = 256  # the embeddings play no part
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    block = model.model.layers[0]
    D = config.hidden_size
    hidden = torch.randn(args.samples, args.seq_len, D, dtype=torch.bfloat16)
    ids = torch.arange(args.seq_len)[None]
    cos_sin = model.model.rotary_emb(hidden[:1], ids)
    context = {"all": ((), {"position_embeddings": cos_sin, "attention_mask": None})}
    inputs = [BlockInputs(hidden[i : i + 8], context) for i in range(0, args.samples, 8)]
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    t = time.perf_counter()
    stats = _run_block(block, "all", inputs, linears, ("act", "hessian"), write=True)
    stats_s = time.perf_counter() - t
    hessians = {}
    for name, st in stats.items():
        hessians.setdefault(id(st.hessian), (name, st.hessian))
    tensors = {name: H.contiguous() for name, H in hessians.values()}
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "block-hessians.safetensors"
    t = time.perf_counter()
    save_file(tensors, str(path))
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    disk_s = time.perf_counter() - t
    per_block = path.stat().st_size
    path.unlink()
    spec = QuantSpec("int4", group_size=128)
    t = time.perf_counter()
    for name, m in linears.items():
        gptq(m.weight.detach().float(), stats[name].hessian_matrix(), spec)
    gptq_s = time.perf_counter() - t
    blocks = SHAPES[args.shape]["num_hidden_layers"]
    params = sum(p.numel() for p in block.parameters()) * blocks
    params += SHAPES[args.shape]["vocab_size"] * D * (1 if SHAPES[args.shape]["tie_word_embeddings"] else 2)
    row = {
        "shape": args.shape,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "stats_seconds": round(stats_s, 2),
        "hessians_write_read_seconds": round(disk_s, 2),
        "gptq_seconds": round(gptq_s, 2),
        "hessian_bytes_per_block": per_block,
        "hessian_bytes_all_blocks": per_block * blocks,
        "model_bf16_bytes": 2 * params,
    }
    print(json.dumps(row) if args.json else "\n".join(f"{k}: {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
