"""Peak resident memory of a `lowbit compress` job, phase by phase (the functions it spends its time in).

Usage:
    OMP_NUM_THREADS=1 python scripts/bench_phases.py [--phase module:function ...] [--json] -- \
        compress --model DIR --preset alloc-awq --budget 3.25 --out OUT ...

Runs `lowbit.cli.main` on the arguments after `--` in this process while a thread samples its resident
set size (/proc/self/statm) every 10 ms. Each `--phase` function (default `PHASES`: the budget path's
stages and the loss passes) is wrapped wherever a loaded `lowbit` module refers to it; each prints its
calls, seconds, the RSS when it was first entered and the largest RSS seen while any call of it ran
(phases nest: a loss pass runs inside the probe stage). The job's own peak is the last line.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import time

from bench_gptq_memory import RssSampler

PHASES = (
    "lowbit.compress.budget:table_stage",
    "lowbit.compress.budget:probe_stage",
    "lowbit.compress.budget:search_stage",
    "lowbit.compress.budget_passes:apply_pass",
    "lowbit.compress.budget:check_stage",
    "lowbit.compress.budget_stream:write_pass",
    "lowbit.compress.losses:capture_block_inputs",
    "lowbit.compress.losses:_head_loss",
)


class Phases(RssSampler):
    """An RSS sampler that also raises the peak of every phase running when it samples."""

    def __init__(self):
        super().__init__()
        self.active: list[str] = []
        self.rows: dict[str, dict] = {}

    def peak(self) -> int:
        rss = self.rss()
        self.top = max(self.top, rss)
        for name in list(self.active):
            self.rows[name]["peak"] = max(self.rows[name]["peak"], rss)
        return self.top

    def wrap(self, name: str, fn):
        row = self.rows.setdefault(name, dict(phase=name, calls=0, seconds=0.0, first=None, peak=0))

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            row["calls"] += 1
            if row["first"] is None:
                row["first"] = self.rss()
            self.active.append(name)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                row["seconds"] += time.perf_counter() - t0
                self.peak()
                self.active.remove(name)

        return timed


def patch(phases: Phases, spec: str) -> None:
    """Wrap module:function (or module:Class.method, on the class) in its module and wherever another
    loaded lowbit module imported it."""
    module, attr = spec.split(":")
    owner, _, name = attr.rpartition(".")
    obj = importlib.import_module(module)
    if owner:
        obj = getattr(obj, owner)
        setattr(obj, name, phases.wrap(attr, getattr(obj, name)))
        return
    fn = getattr(obj, name)
    timed = phases.wrap(attr, fn)
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("lowbit") and getattr(mod, attr, None) is fn:
            setattr(mod, attr, timed)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", action="append", help="module:function (repeatable; default PHASES)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv[:split])
    import lowbit.cli
    import lowbit.compress.budget_stream  # noqa: F401  (loaded so that its imports are patched too)

    phases = Phases()
    for spec in args.phase or PHASES:
        patch(phases, spec)
    phases.start()
    t0 = time.perf_counter()
    rc = lowbit.cli.main(argv[split + 1 :])
    total = dict(phase="job", calls=1, seconds=time.perf_counter() - t0, first=None, peak=phases.peak())
    phases.stop.set()
    rows = [*phases.rows.values(), total]
    if args.json:
        print(json.dumps(dict(rc=rc, phases=rows)))
        return
    for r in rows:
        first = "" if r["first"] is None else f", {r['first'] / 1e9:.2f} GB when first entered"
        calls = f"{r['phase']:<22} {r['calls']:4d} calls {r['seconds']:8.1f} s"
        print(f"{calls}  peak RSS {r['peak'] / 1e9:.2f} GB{first}")


if __name__ == "__main__":
    main()
