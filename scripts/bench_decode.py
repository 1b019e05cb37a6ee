"""Decode speed of a Llama-architecture model with random weights: tokens per second, bf16 against
every decoder linear layer compressed to QLinear int4-g128 (Triton kernels).

Usage:
    python scripts/bench_decode.py                                   # Llama-3-8B shapes, batch 1 and 16
    python scripts/bench_decode.py --model llama-3.2-1b --batch 1 4 16 --new-tokens 64
    python scripts/bench_decode.py --static                          # static KV cache + torch.compile
    python scripts/bench_decode.py --graph                           # one CUDA graph per decode step
    python scripts/bench_decode.py --dry-run                         # any machine: check the plan, exit
    python scripts/bench_decode.py --model tiny --device cpu         # a functional run on the CPU

The model is built from its config alone (random weights, bf16) on the GPU. For each batch size a
random prompt of --prompt-len tokens is prefilled, then --new-tokens tokens are decoded greedily; the
decode steps are timed (after one untimed warm-up pass, which also autotunes the kernels) and reported
as tokens per second = batch * new tokens / seconds. The same runs are then repeated after every
linear layer of the decoder blocks (not the embedding or lm_head) is replaced by QLinear int4-g128.

Default mode: an eager decode loop (one model call per token, dynamic KV cache), which includes
Python overhead per layer. --static: `model.generate` with a static KV cache, which transformers
compiles (torch.compile, CUDA graphs); the decode time is then the time of a generate of
--new-tokens tokens minus one of a single token. --graph (the documented decode path for QLinear
layers): a static KV cache, and one decode step (every layer's kernel launches) captured once in a
CUDA graph after two warm-up steps (which prepare the layers' kernel layouts and configurations, so
nothing is allocated or checked inside the graph) and replayed per token; the host pays one replay
per token instead of the Python of every layer.

--dry-run needs no GPU: it checks the arguments, the imports the run needs, and the weight memory of
the model in bf16 and int4-g128 against an 80 GiB GPU, prints the plan and exits 0 (1 if anything is
wrong).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=1024,
    ),
}
DTYPE = torch.bfloat16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3-8b", choices=list(MODELS))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--static", action="store_true", help="generate with a static KV cache (compiled)")
    mode.add_argument("--graph", action="store_true", help="replay one CUDA graph per decode step")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (eager and --static only)")
    p.add_argument("--dry-run", action="store_true", help="check the plan and exit (no GPU needed)")
    return p.parse_args(argv)


GPU_BYTES = 80 * 2**30


def plan(args: argparse.Namespace) -> dict:
    """Weight bytes of the model in bf16 and after compression; ValueError for a plan that cannot run."""
    from lowbit.quantizers import QuantSpec, storage_bits

    if min(args.batch) < 1 or args.prompt_len < 1 or args.new_tokens < 2:
        raise ValueError("batch sizes and --prompt-len must be positive, --new-tokens at least 2")
    if args.graph and args.device != "cuda":
        raise ValueError("--graph needs --device cuda")
    c = MODELS[args.model]
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # q k v o gate up down: [N, K]
    linear = layers * sum(n * k for n, k in shapes)
    other = (1 if c.get("tie_word_embeddings") else 2) * c["vocab_size"] * h
    packed = layers * sum(storage_bits(QuantSpec("int4", 128), s) for s in shapes) // 8
    out = dict(bf16_bytes=2 * (linear + other), int4_bytes=packed + 2 * other)
    if out["bf16_bytes"] > GPU_BYTES // 2:
        raise ValueError(f"{args.model} needs {out['bf16_bytes'] / 2**30:.1f} GiB in bf16")
    return out


def dry_run(args: argparse.Namespace, sizes: dict) -> int:
    """Import what the run imports, print the plan."""
    import transformers  # noqa: F401
    import triton  # noqa: F401

    from lowbit.kernels import prepared, triton_decode  # noqa: F401

    mode = "graph" if args.graph else "static" if args.static else "eager"
    print(f"bench_decode plan: {args.model} ({mode}), batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens; weights {sizes['bf16_bytes'] / 2**30:.2f} GiB bf16, "
          f"{sizes['int4_bytes'] / 2**30:.2f} GiB int4-g128")  # fmt: skip
    print("dry run: no GPU work done")
    return 0


def build_model(name: str, device: torch.device) -> nn.Module:
    """A LlamaForCausalLM of the named shapes with random bf16 weights, built on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODELS[name])
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)  # initialise in bf16 directly: an 8B model in fp32 needs 32 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def compress_linears(model: nn.Module, spec) -> int:
    """Replace every nn.Linear inside the decoder blocks by a QLinear of `spec`; returns how many."""
    from lowbit.nn.qlinear import QLinear, set_submodule
    from lowbit.quantizers import quantize

    names = [n for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        linear = model.model.layers.get_submodule(name)
        q = quantize(linear.weight.detach(), spec)
        set_submodule(model.model.layers, name, QLinear.from_linear(linear, q))
        del linear
    return len(names)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def eager_decode_seconds(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds of `new_tokens` greedy single-token steps after prefilling `prompt` [B, T]."""
    out = model(prompt, use_cache=True)
    cache, ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(prompt.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(ids, past_key_values=cache, use_cache=True)
        cache, ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(prompt.device)
    return time.perf_counter() - start


@torch.inference_mode()
def static_decode_seconds(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds of decoding new_tokens - 1 tokens with `generate` and a static KV cache (compiled)."""

    def generate_seconds(n: int) -> float:
        _sync(prompt.device)
        start = time.perf_counter()
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
        )
        _sync(prompt.device)
        return time.perf_counter() - start

    return generate_seconds(new_tokens) - generate_seconds(1)


@torch.inference_mode()
def graph_decode_seconds(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds of `new_tokens` greedy steps, each one replay of a CUDA graph of the decode step."""
    from transformers import StaticCache

    T = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=T + new_tokens + 3)
    out = model(prompt, past_key_values=cache, cache_position=torch.arange(T, device=prompt.device))
    ids = out.logits[:, -1:].argmax(-1)  # [B, 1], the graph's input buffer
    pos = torch.full((1,), T, device=prompt.device)  # the graph's cache position
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: layouts, configurations, scratch, autotuning
        for _ in range(2):
            model(ids, past_key_values=cache, cache_position=pos)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model(ids, past_key_values=cache, cache_position=pos).logits
    _sync(prompt.device)
    start = time.perf_counter()
    for step in range(new_tokens):
        pos.fill_(T + 2 + step)
        graph.replay()
        ids.copy_(logits[:, -1:].argmax(-1))
    _sync(prompt.device)
    return time.perf_counter() - start


def tokens_per_second(model: nn.Module, batch: int, args: argparse.Namespace, device: torch.device) -> float:
    vocab = model.config.vocab_size
    prompt = torch.randint(vocab, (batch, args.prompt_len), device=device)
    run = eager_decode_seconds
    if args.graph or args.static:
        run = graph_decode_seconds if args.graph else static_decode_seconds
    run(model, prompt, args.new_tokens)  # warm-up: compilation, autotuning, allocator
    steps = args.new_tokens - 1 if args.static else args.new_tokens
    return batch * steps / run(model, prompt, args.new_tokens)


def weight_gib(model: nn.Module) -> float:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**30


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sizes = plan(args)
    except ValueError as e:
        print(f"bench_decode: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        return dry_run(args, sizes)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "bench_decode.py needs a CUDA GPU; none is available here (--device cpu: a dry run).",
            file=sys.stderr,
        )
        return 1
    from lowbit.quantizers import QuantSpec

    model = build_model(args.model, device)
    mode = "CUDA graph per step" if args.graph else "static cache, compiled" if args.static else "eager"
    print(f"model {args.model} ({mode}), prompt {args.prompt_len}, {args.new_tokens} new tokens")
    results = {}
    for label in ("bf16", "int4-g128"):
        if label != "bf16":
            count = compress_linears(model, QuantSpec("int4", 128))
            print(f"compressed {count} linear layers to QLinear int4-g128")
        print(f"{label}: weights {weight_gib(model):.2f} GiB")
        for batch in args.batch:
            results[label, batch] = tokens_per_second(model, batch, args, device)
            print(f"  batch {batch:>3}: {results[label, batch]:10.1f} tokens/s", flush=True)
    for batch in args.batch:
        speedup = results["int4-g128", batch] / results["bf16", batch]
        print(f"batch {batch:>3}: int4-g128 / bf16 = {speedup:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
