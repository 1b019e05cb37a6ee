"""Scale benchmark: wall time, peak RSS and output size of `lowbit compress` on big Llama-shaped models.

Usage:
    python scripts/bench_scale.py --shape 0.5b [--preset int4-g128] [--budget B] [--dtype bfloat16]
        [--layers N] [--root /tmp/lowbit-scale] [--keep] [--json] [-- more compress arguments]

The weights are RANDOM (normal, std 0.02; norms ones): the shapes are those of real models, the values
are not, so the numbers measure memory, time and disk, never quality. The model is written to
`<root>/<shape>-<dtype>[-L<layers>]/model` shard by shard (at most --shard-mb of tensors in memory at
once, never the whole model) with a small byte-level BPE tokenizer, and reused by later runs. Then
`python -m lowbit.cli compress --model <that folder> --preset <preset> --out <root>/.../out` runs in a
subprocess under `/usr/bin/time -v` (peak RSS of the compress process) while a thread polls the size of
the work area (`.lowbit-work` beside the output). Each run prints the source size, wall time, peak RSS,
peak work-area disk and output size, the last three also as ratios to the source model's size, with the
`lowbit.compress.dry_run` predictions of the peak RSS and output size beside them (of the job as run:
the extra arguments' --samples, --seq-len and --max-hidden-memory included).

Shapes (`SHAPES`): 0.5b and 1.5b are Qwen2.5-0.5B / 1.5B's dimensions as a Llama (tied embeddings,
vocabulary 151936); 8b is Llama-3-8B's (--layers 2 for a short run over its first blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool):
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        tie_word_embeddings=tied,
    )


SHAPES = {
    "0.5b": _llama(896, 4864, 24, 14, 2, 151936, True),
    "1.5b": _llama(1536, 8960, 28, 12, 2, 151936, True),
    "8b": {**_llama(4096, 14336, 32, 32, 8, 128256, False), "rope_theta": 500000.0},
}
TEXT = "The council voted on Tuesday to expand the city's bus network, adding three routes to the east. "


def llama_config(shape: str, dtype: torch.dtype, layers: int | None = None):
    from transformers import LlamaConfig

    cfg = dict(SHAPES[shape], max_position_embeddings=4096, dtype=dtype)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return LlamaConfig(**cfg)


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the model's parameters (tied copies once), from a skeleton on the meta device."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def write_random_model(folder: Path, config, dtype: torch.dtype, shard_mb: int = 1024, seed: int = 0) -> int:
    """Write a random-weight model (safetensors shards + index, config, tokenizer) into `folder`;
    return the bytes of its tensors. At most one shard of tensors is in memory at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = parameter_shapes(config)
    limit = shard_mb << 20
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if current and size + nbytes > limit:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name in names:
            if name.endswith("norm.weight"):
                shard[name] = torch.ones(shapes[name], dtype=dtype)
            else:
                shard[name] = (torch.randn(shapes[name], generator=gen) * 0.02).to(dtype)
            weight_map[name] = file
            total += shard[name].numel() * dtype.itemsize
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return total


def tokenizer():
    """A small byte-level BPE tokenizer (its ids are a prefix of any big vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False)
    tok.train_from_iterator([TEXT] * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def folder_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class DiskPoller(threading.Thread):
    """Polls the size of a folder every `period` seconds; `.peak` is the largest size seen."""

    def __init__(self, path: Path, period: float = 1.0):
        super().__init__(daemon=True)
        self.path, self.period, self.peak = path, period, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, folder_bytes(self.path))
            except FileNotFoundError:  # a file renamed or removed while walking
                pass
            self.stop.wait(self.period)


def run_compress(model_dir: Path, out: Path, preset: str, extra: list[str]) -> dict:
    """Run `lowbit compress` under /usr/bin/time -v; wall seconds, peak RSS, peak work area, output."""
    work = out.parent / ".lowbit-work"
    cmd = [sys.executable, "-m", "lowbit.cli", "compress", "--model", str(model_dir), "--preset", preset]
    cmd += ["--out", str(out), "--overwrite", "--json", *extra]
    poller = DiskPoller(work)
    poller.start()
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    poller.stop.set()
    poller.join()
    if proc.returncode != 0:
        sys.exit(f"compress failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    return {
        "seconds": seconds,
        "peak_rss": rss_kb * 1024,
        "peak_work": poller.peak,
        "work_left": folder_bytes(work),
        "out_bytes": folder_bytes(out),
        "bits_per_weight": result.get("bits_per_weight"),
    }


def predicted_recipe(preset: str, extra: list[str]):
    """The preset with the calibration settings that the extra `lowbit compress` arguments override
    (--samples, --seq-len, --max-hidden-memory), so that the dry run predicts the job that runs."""
    from dataclasses import replace

    from lowbit.compress.presets import preset as named

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--samples", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--max-hidden-memory")
    given = {k: v for k, v in vars(p.parse_known_args(extra)[0]).items() if v is not None}
    recipe = named(preset)
    return replace(recipe, calibration=replace(recipe.calibration, **given)) if given else recipe


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=tuple(SHAPES), default="0.5b")
    p.add_argument("--preset", default="int4-g128")
    p.add_argument("--budget", type=float, help="bits per weight: the budget path (with --preset alloc-int)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--layers", type=int, help="keep only the first N decoder blocks")
    p.add_argument("--shard-mb", type=int, default=1024)
    p.add_argument("--root", default="/tmp/lowbit-scale")
    p.add_argument("--keep", action="store_true", help="keep the compressed checkpoint")
    p.add_argument("--json", action="store_true")
    p.add_argument("extra", nargs="*", help="more `lowbit compress` arguments (after --)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    name = f"{args.shape}-{args.dtype}" + (f"-L{args.layers}" if args.layers else "")
    base = Path(args.root) / name
    model_dir = base / "model"
    if not (model_dir / "model.safetensors.index.json").is_file():
        config = llama_config(args.shape, dtype, args.layers)
        t0 = time.perf_counter()
        write_random_model(model_dir, config, dtype, args.shard_mb)
        print(f"wrote {model_dir} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    source = index["metadata"]["total_size"]
    from lowbit.compress import dry_run

    plan = dry_run(str(model_dir), predicted_recipe(args.preset, args.extra), budget=args.budget)
    out = base / f"out-{args.preset}" if args.budget is None else base / f"out-{args.preset}-{args.budget:g}"
    extra = args.extra if args.budget is None else ["--budget", str(args.budget), *args.extra]
    r = run_compress(model_dir, out, args.preset, extra)
    if not args.keep:
        subprocess.run(["rm", "-rf", str(out)], check=True)
    r.update(
        model=name,
        preset=args.preset,
        source_bytes=source,
        predicted_peak_rss=plan.peak_ram_bytes,
        predicted_out_bytes=plan.output_bytes[0],
    )
    if args.json:
        print(json.dumps(r))
        return
    gb = 1e9
    rss, work, out_bytes = r["peak_rss"], r["peak_work"], r["out_bytes"]
    print(
        f"{name} {args.preset}: source {source / gb:.2f} GB, {r['seconds']:.1f} s, "
        f"peak RSS {rss / gb:.2f} GB ({rss / source:.2f}x; predicted {plan.peak_ram_bytes / gb:.2f} GB), "
        f"work area peak {work / gb:.2f} GB ({work / source:.2f}x, {r['work_left'] / gb:.2f} GB left), "
        f"output {out_bytes / gb:.3f} GB ({out_bytes / source:.2f}x; "
        f"predicted {plan.output_bytes[0] / gb:.3f} GB), "
        f"{r['bits_per_weight']:.3f} bits per weight"
    )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
