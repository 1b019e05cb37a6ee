"""The `lowbit` command line: compress, eval, info, export (argument parsing and printing only).

Every command exits 0 only on success; bad input prints one `lowbit: error: ...` line and exits 2
(set LOWBIT_DEBUG=1 for the full traceback). Every argument, file and budget is checked before a model
is loaded. `-v` shows lowbit's log (per-stage timings, solver status) on stderr, `-vv` its debug log;
`--log-file` appends the same records to a file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from lowbit import __version__
from lowbit.compress.budget import with_budget
from lowbit.compress.checks import DTYPES as MODEL_DTYPES
from lowbit.compress.checks import calibrates, check_budgets, check_device, check_dtype, check_source
from lowbit.compress.memory import release_freed_memory
from lowbit.compress.presets import (
    BUDGET_PRESET,
    BUDGET_PRESET_FT,
    BUDGET_PRESET_NF4,
    BUDGET_PRESET_NF4_FT,
    ENGINE_PRESETS,
    FINETUNE_BELOW,
    NF4_FROM,
    PRESETS,
    budget_preset,
    preset,
)
from lowbit.compress.recipe import Recipe, load_recipe
from lowbit.eval.compare import compare
from lowbit.export import DTYPES, EMBEDDING_TYPES, TARGETS
from lowbit.models.source import streams_folder
from lowbit.nn.shards import parse_size
from lowbit.parallel import launched_size
from lowbit.quantizers.engines import ENGINES

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DATA = "builtin:lee-news"
DEFAULT_PRESET = "int4-g128"


def _positive(minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return v

    return parse


def _common() -> argparse.ArgumentParser:
    """Options every command takes: --json, -v, --log-file."""
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    c.add_argument("-v", "--verbose", action="count", default=0, help="log progress details (-vv: debug)")
    c.add_argument("--log-file", help="append lowbit's log records to this file")
    return c


def _runtime(parser: argparse.ArgumentParser, dtype_help: str) -> None:
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", choices=tuple(MODEL_DTYPES), help=dtype_help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lowbit", description="Compress LLMs into low-bit + low-rank checkpoints."
    )
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    common = _common()

    c = sub.add_parser("compress", parents=[common], help="compress a model into a lowbit checkpoint")
    c.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"built-in name, local folder/.gguf or hub id (default {DEFAULT_MODEL})",
    )
    c.add_argument("--recipe", help="recipe file (.yaml/.json); see lowbit.compress.recipe")
    c.add_argument(
        "--preset",
        help=f"named recipe: {', '.join(PRESETS)} (default {DEFAULT_PRESET}; with a budget {BUDGET_PRESET}, "
        f"below {FINETUNE_BELOW:g} bits {BUDGET_PRESET_FT} unless the model is streamed, from {NF4_FROM:g} "
        f"bits {BUDGET_PRESET_NF4_FT} ({BUDGET_PRESET_NF4} if streamed); with a --target "
        f"other than lowbit {' / '.join(ENGINE_PRESETS)})",
    )
    c.add_argument(
        "--data", help=f"calibration (and --eval) text source (default: the recipe's, {DEFAULT_DATA})"
    )
    c.add_argument("--samples", type=_positive(1), help="calibration blocks (overrides the recipe)")
    c.add_argument("--seq-len", type=_positive(2), help="tokens per calibration block (overrides the recipe)")
    c.add_argument("--out", required=True, help="output checkpoint folder")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.add_argument(
        "--budget", type=float, help="average bits per weight: allocate format, group and rank per layer"
    )
    c.add_argument("--budgets", help="several budgets, e.g. 2.5,3,3.5,4.25: one checkpoint each under --out")
    c.add_argument(
        "--target",
        choices=list(ENGINES),
        help="the engine that serves the result (default: the recipe's, lowbit): only specs it serves, "
        "fused q/k/v and gate/up layers tied to one scheme",
    )
    c.add_argument("--restart", action="store_true", help="discard the work area of an earlier run")
    c.add_argument(
        "--dry-run",
        action="store_true",
        help="read only the config and shapes: print the plan (sizes, predicted memory) and check the job",
    )
    c.add_argument("--work-dir", help="where finished stages are kept (default: .lowbit-work beside --out)")
    c.add_argument(
        "--keep-work",
        action="store_true",
        help="keep the work area after success (a later run with another budget reuses its error table)",
    )
    c.add_argument(
        "--max-work-size", help="stop when the work area grows past this, e.g. 50GB (default: no limit)"
    )
    c.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard written, e.g. 2GB (default 5GB)"
    )
    c.add_argument(
        "--max-hidden-memory",
        help="calibration hidden states kept in memory, e.g. 4GB; the rest go to disk (default: no limit)",
    )
    c.add_argument(
        "--eval", action="store_true", help="reload the checkpoint and compare perplexity with the original"
    )
    c.add_argument(
        "--eval-data",
        help="evaluate (implies --eval) on these texts instead, comma-separated: "
        "e.g. builtin:lee-news,builtin:bible (in and out of domain)",
    )
    c.add_argument(
        "--eval-tokens", type=_positive(2), default=None, help="cap on held-out tokens of each --eval text"
    )
    c.add_argument(
        "--no-baselines", action="store_true", help="evaluate without the round-to-nearest baselines"
    )
    _runtime(c, "dtype the source model is loaded in (default: its own; GGUF files float32)")
    c.add_argument(
        "--nproc",
        type=_positive(1),
        default=1,
        help="processes to run on (torchrun; with --device cuda, one GPU each); default 1",
    )

    e = sub.add_parser("eval", parents=[common], help="perplexity of a model or checkpoint on held-out text")
    e.add_argument(
        "target", nargs="?", default=DEFAULT_MODEL, help="lowbit checkpoint folder, model name or path"
    )
    e.add_argument("--data", default=DEFAULT_DATA, help=f"text source (default {DEFAULT_DATA})")
    e.add_argument(
        "--tokens", type=_positive(2), default=None, help="evaluate at most this many held-out tokens"
    )
    e.add_argument(
        "--seq-len", type=_positive(2), default=512, help="window length (non-overlapping windows)"
    )
    e.add_argument("--batch-size", type=_positive(1), default=4)
    _runtime(e, "dtype of unquantized tensors (default: a checkpoint's stored dtypes, else float32)")

    x = sub.add_parser(
        "export",
        parents=[common],
        help="export a lowbit checkpoint for vLLM/SGLang, llama.cpp (GGUF) or as a dense model",
    )
    x.add_argument("checkpoint", help="lowbit checkpoint folder")
    x.add_argument("--to", required=True, choices=tuple(TARGETS), dest="target", help="export target")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument(
        "--convert",
        action="store_true",
        help="re-quantize layers the target format cannot hold (default: refuse and list them)",
    )
    x.add_argument("--dtype", choices=tuple(DTYPES), help="dtype written (default: the checkpoint's)")
    x.add_argument(
        "--embedding",
        choices=tuple(EMBEDDING_TYPES),
        help="gguf: the token embedding's type (default auto: Q6_K where rows are a multiple of 256 and "
        "the layers are not Q8_0, else Q8_0, as llama-quantize writes it)",
    )
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    i = sub.add_parser("info", parents=[common], help="per-layer formats and sizes of a lowbit checkpoint")
    i.add_argument("checkpoint", help="lowbit checkpoint folder")
    return p


def preset_name(args: argparse.Namespace) -> str:
    """--preset, or the default: the best measured budget recipe with --budget(s)
    (`lowbit.compress.presets.budget_preset`), int4-g128 without."""
    if args.preset:
        return args.preset
    budgets = parse_budgets(args)
    if not budgets:
        return DEFAULT_PRESET
    return budget_preset(budgets, streams_folder(args.model, args.out), args.target or "lowbit")


def resolve_recipe(args: argparse.Namespace) -> Recipe:
    if args.recipe and args.preset:
        raise ValueError("give either --recipe or --preset, not both")
    return load_recipe(args.recipe) if args.recipe else preset(preset_name(args))


def calibration_args(args: argparse.Namespace, recipe: Recipe, budgets: list[float] | None) -> dict:
    """compress()'s data / samples / seq_len from --data, --samples, --seq-len; refused when unused."""
    evaluates = args.eval or args.eval_data is not None or len(budgets or []) > 1
    uses = calibrates(with_budget(recipe, budgets[0]) if budgets else recipe)
    name = f"--recipe {args.recipe}" if args.recipe else f"--preset {preset_name(args)}"
    unused = "reads no calibration data (no GPTQ, SVDQuant, Fisher weights or fine-tuning)"
    for flag, value in (("--samples", args.samples), ("--seq-len", args.seq_len)):
        if value is not None and not uses:
            raise ValueError(f"{flag} is not used: {name} {unused}")
    if args.data and not uses and (args.eval_data is not None or not evaluates):
        hint = "add --eval" if args.eval_data is None else "list it in --eval-data"
        raise ValueError(f"--data is not used: {name} {unused}; drop it, or {hint} to evaluate on it")
    if args.no_baselines and not evaluates:
        raise ValueError("--no-baselines needs --eval or several --budgets")
    if args.data:
        check_source(args.data)
    return {"data": args.data if uses else None, "samples": args.samples, "seq_len": args.seq_len}


def eval_texts(args: argparse.Namespace) -> list[str]:
    """--eval-data's text sources, each checked now (before any weight is read); [] without it."""
    if args.eval_data is None:
        return []
    if args.dry_run:
        raise ValueError("--eval-data evaluates the written checkpoint; --dry-run writes none")
    texts = [t.strip() for t in args.eval_data.split(",")]
    if not all(texts) or len(set(texts)) < len(texts):
        raise ValueError(f"--eval-data must be distinct comma-separated text sources, got {args.eval_data!r}")
    for text in texts:
        check_source(text)
    return texts


def cmd_compress(args: argparse.Namespace) -> dict:
    from lowbit.compress.api import compress

    recipe = resolve_recipe(args)
    texts = eval_texts(args)
    if args.target is not None:
        recipe = replace(recipe, target=args.target)
    if args.max_hidden_memory is not None:
        limit = parse_size(args.max_hidden_memory, "--max-hidden-memory")
        recipe = replace(recipe, calibration=replace(recipe.calibration, max_hidden_memory=limit))
    budgets = parse_budgets(args)
    if args.dry_run:
        from lowbit.compress import dry_run

        given = {k: v for k, v in calibration_args(args, recipe, budgets).items() if v is not None}
        recipe = replace(recipe, calibration=replace(recipe.calibration, **given))  # the job as it would run
        return {"dry_run": dry_run(args.model, recipe, budgets=budgets, dtype=args.dtype).to_dict()}
    out = Path(args.out)
    progress = not args.json
    report = compress(  # the model it returns is not kept: the evaluations below load what they read
        args.model,
        recipe,
        out,
        **calibration_args(args, recipe, budgets),
        device=args.device,
        dtype=args.dtype,
        budgets=budgets,
        overwrite=args.overwrite,
        restart=args.restart,
        work_dir=args.work_dir,
        progress=progress,
        max_shard_size=args.max_shard_size,
        keep_work=args.keep_work,
        max_work_size=args.max_work_size,
    )[1]
    release_freed_memory()  # the compressed model's, before the evaluations load theirs
    result = {
        "out": str(out),
        "model": args.model,
        "bits_per_weight": report.bits_per_weight,
        "quantized_params": report.quantized_params,
        "seconds": round(report.seconds, 1),
        "size_bytes": _folder_bytes(out),
    }
    if report.budgets:
        keys = ("budget", "bits_per_weight", "out", "error", "solver_status", "solve_seconds", "work_bytes")
        result["budgets"] = [{k: b[k] for k in keys} for b in report.budgets]
    if args.eval or texts or len(report.budgets) > 1:
        shapes = [tuple(e["shape"]) for e in report.layers.values()]
        baselines = None if args.no_baselines else shapes
        job = dict(
            tokens=args.eval_tokens, device=args.device, dtype=check_dtype(args.dtype), progress=progress
        )
        compared = compare(
            args.model, result, texts or [args.data or recipe.calibration.data], baselines, **job
        )
        if not texts:  # without --eval-data: only the one text's keys
            del compared["eval"]
        result.update(compared)
    return result


def parse_budgets(args: argparse.Namespace) -> list[float] | None:
    if args.budget is not None and args.budgets:
        raise ValueError("give either --budget or --budgets, not both")
    if args.budget is not None:
        return [args.budget]
    if not args.budgets:
        return None
    try:
        budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        raise ValueError(f"--budgets must be comma-separated numbers, got {args.budgets!r}") from None
    return check_budgets(budgets)


def cmd_eval(args: argparse.Namespace) -> dict:
    from lowbit.eval import evaluate

    a = args
    device, dtype = check_device(a.device), check_dtype(a.dtype)
    check_source(a.data)
    return evaluate(
        a.target, a.data, a.tokens, a.seq_len, a.batch_size, progress=not a.json, device=device, dtype=dtype
    )


def cmd_export(args: argparse.Namespace) -> dict:
    from lowbit.export import export

    a = args
    return export(
        a.checkpoint,
        a.out,
        a.target,
        convert=a.convert,
        dtype=a.dtype,
        overwrite=a.overwrite,
        embedding=a.embedding,
    )


def cmd_info(args: argparse.Namespace) -> dict:
    from lowbit.nn.checkpoint import checkpoint_info

    return checkpoint_info(args.checkpoint)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def print_text(command: str, r: dict) -> None:
    if "dry_run" in r:
        for key, value in r["dry_run"].items():
            print(f"{key:<24} {value}")
        return
    if command == "info":
        print(f"{'layer':<48} {'format':<18} {'rank':>4} {'bpw':>6} {'bytes':>10}")
        for name, x in r["layers"].items():
            print(f"{name:<48} {x['spec']:<18} {x['rank']:>4} {x['bits_per_weight']:>6.3f} {x['bytes']:>10}")
        t = r["totals"]
        print(
            f"{len(r['layers'])} quantized layers, {t['params']} weights, "
            f"{t['bits_per_weight']:.3f} bits per weight, {t['file_bytes'] / 2**20:.1f} MiB on disk"
        )
    elif command == "export":
        _print_export(r)
    elif command == "eval":
        print(
            f"{r['target']}: perplexity {r['perplexity']:.3f} on {r['tokens']} held-out tokens of "
            f"{r['data']} ({r['bits_per_weight']:.2f} bits per weight, {r['seconds']} s)"
        )
    else:
        print(
            f"wrote {r['out']}: {r['bits_per_weight']:.3f} bits per weight over {r['quantized_params']} "
            f"quantized weights, {r['size_bytes'] / 2**20:.1f} MiB on disk, {r['seconds']} s"
        )
    for block in r.get("eval", [r]):
        _print_perplexities(block, heading="eval" in r)
    if r.get("report"):
        print("wrote " + ", ".join(r["report"]))


def _print_perplexities(r: dict, heading: bool) -> None:
    """One text's perplexities: several budgets' points (headed with `heading`), or original, compressed
    and baselines."""
    if heading and "points" in r:
        print(f"perplexity on {r['points'][0]['tokens']} held-out tokens of {r['data']}:")
    for p in r.get("points", []):
        print(f"  {p['label']:<12} {p['perplexity']:9.3f}  ({p['bits_per_weight']:.2f} bits per weight)")
    if "compressed" in r:
        o, c = r["original"], r["compressed"]
        print(f"perplexity on {c['tokens']} held-out tokens of {c['data']}:")
        print(f"  original   {o['perplexity']:9.3f}  ({o['bits_per_weight']:.2f} bits per weight)")
        print(
            f"  compressed {c['perplexity']:9.3f}  ({c['bits_per_weight']:.2f} bits per weight, "
            f"{100 * (c['perplexity'] / o['perplexity'] - 1):+.1f}%)"
        )
        for name, b in r["rtn"].items():
            print(
                f"  {'rtn ' + name:<10} {b['perplexity']:9.3f}  ({b['bits_per_weight']:.2f} bits per weight)"
            )


def _print_export(r: dict) -> None:
    for name, e in r["layers"].items():
        note = f"  converted: {e['converted']}" if "converted" in e else ""
        print(f"{name:<48} {e['source']:<18} -> {e['target']:<18} rel. error {e['rel_error']:.2e}{note}")
    adapter = f", low-rank adapter in {r['adapter']}" if r["adapter"] else ""
    print(
        f"wrote {r['out']} ({r['target']}, {r['dtype']}{adapter}): {len(r['layers'])} layers, "
        f"{r['converted']} converted, max logit change {r['logits_max_abs_diff']:.3g}"
    )


COMMANDS = {"compress": cmd_compress, "eval": cmd_eval, "info": cmd_info, "export": cmd_export}


def log_handlers(verbose: int, log_file: str | None) -> list[logging.Handler]:
    """Handlers on the "lowbit" logger for -v (stderr) and --log-file; the caller removes them."""
    if log_file and not Path(log_file).expanduser().parent.is_dir():
        raise ValueError(f"--log-file {log_file}: its folder does not exist")
    level = logging.DEBUG if verbose > 1 else logging.INFO
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)] if verbose else []
    if log_file:
        handlers.append(logging.FileHandler(Path(log_file).expanduser(), encoding="utf-8"))
    log = logging.getLogger("lowbit")
    for h in handlers:
        h.setLevel(level)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(h)
    if handlers:
        log.setLevel(level)
    return handlers


def relaunch(argv: list[str], nproc: int) -> int:
    """This command again, without --nproc, under torchrun with `nproc` processes on this machine; its
    exit code. (torchrun's own parser would take --nproc for its --nproc-per-node.)"""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    rest = [a for i, a in enumerate(argv) if not _nproc_token(argv, i)]
    return subprocess.call([*cmd, "-m", "lowbit.cli", *rest])


def _nproc_token(argv: list[str], i: int) -> bool:
    """Whether argv[i] is --nproc, its value, or --nproc=N."""
    return argv[i] == "--nproc" or argv[i].startswith("--nproc=") or (i > 0 and argv[i - 1] == "--nproc")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if getattr(args, "nproc", 1) > 1 and launched_size() == 1 and not args.dry_run:
        return relaunch(argv, args.nproc)
    rank = int(os.environ.get("RANK", "0"))
    if args.json:  # machine-readable runs print nothing but the result
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    log = logging.getLogger("lowbit")
    handlers = []
    try:
        handlers = log_handlers(args.verbose, args.log_file)
        log.info("lowbit %s: %s", __version__, " ".join(argv))
        result = COMMANDS[args.command](args)
    except (ValueError, OSError) as e:
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        log.debug("error", exc_info=True)
        if handlers:
            log.error("%s", e)
        where = f" (rank {rank})" if launched_size() > 1 else ""
        print(f"lowbit: error{where}: {e}", file=sys.stderr)
        return 2
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
    if rank != 0:  # rank 0 speaks for every process
        return 0
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_text(args.command, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
