"""Decode speed of a Llama-architecture model with random weights: tokens per second, bf16 against
every decoder linear layer compressed to QLinear int4-g128 (Triton kernels).

Usage:
    python scripts/bench_decode.py                                   # Llama-3-8B shapes, batch 1 and 16
    python scripts/bench_decode.py --model llama-3.2-1b --batch 1 4 16 --new-tokens 64
    python scripts/bench_decode.py --static                          # static KV cache + torch.compile
    python scripts/bench_decode.py --model tiny --device cpu         # a functional dry run, no GPU

The model is built from its config alone (random weights, bf16) on the GPU. For each batch size a
random prompt of --prompt-len tokens is prefilled, then --new-tokens tokens are decoded greedily; the
decode steps are timed (after one untimed warm-up pass, which also autotunes the kernels) and reported
as tokens per second = batch * new tokens / seconds. The same runs are then repeated after every
linear layer of the decoder blocks (not the embedding or lm_head) is replaced by QLinear int4-g128.

Default mode: an eager decode loop (one model call per token, dynamic KV cache), which includes
Python overhead per layer. --static: `model.generate` with a static KV cache, which transformers
compiles (torch.compile, CUDA graphs); the decode time is then the time of a generate of
--new-tokens tokens minus one of a single token.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

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
    p.add_argument("--static", action="store_true", help="generate with a static KV cache (compiled)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    return p.parse_args(argv)


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


def tokens_per_second(model: nn.Module, batch: int, args: argparse.Namespace, device: torch.device) -> float:
    vocab = model.config.vocab_size
    prompt = torch.randint(vocab, (batch, args.prompt_len), device=device)
    run = static_decode_seconds if args.static else eager_decode_seconds
    run(model, prompt, args.new_tokens)  # warm-up: compilation, autotuning, allocator
    steps = args.new_tokens - 1 if args.static else args.new_tokens
    return batch * steps / run(model, prompt, args.new_tokens)


def weight_gib(model: nn.Module) -> float:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**30


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "bench_decode.py needs a CUDA GPU; none is available here (--device cpu: a dry run).",
            file=sys.stderr,
        )
        return 1
    from lowbit.quantizers import QuantSpec

    model = build_model(args.model, device)
    mode = "static cache, compiled" if args.static else "eager"
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
