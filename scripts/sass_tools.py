"""The compile-and-read machinery of `scripts/kernel_sass.py`: compile a Triton kernel for an NVIDIA
target on any machine, disassemble it with the triton wheel's cuobjdump, and count the hot loop."""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    """One kernel compilation: the jitted function, its constexprs and pointer types, the weight tile."""

    kernel: str
    format: str
    M: str
    config: str
    fn: object
    consts: dict
    pointers: dict
    num_warps: int
    num_stages: int
    weights_per_iter: int
    whole_program: bool = False  # no K loop: count every instruction (weights_per_iter: per program)


def nvidia_bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def compile_cubin(case: Case, arch: int) -> bytes:
    """The cubin of `case` for sm_<arch>; every pointer not in case.pointers points to bf16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = case.fn
    consts = {k: v for k, v in case.consts.items() if k in fn.arg_names}
    sig = {
        n: "constexpr" if n in consts else case.pointers.get(n, "*bf16") if n.endswith("_ptr") else "i32"
        for n in fn.arg_names
    }
    # what a launch on a 4096-wide layer specializes: pointers and every integer but M divisible by 16
    hinted = [i for i, n in enumerate(sig) if sig[n] != "constexpr" and n != "M"]
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    options = dict(num_warps=case.num_warps, num_stages=case.num_stages)
    src = ASTSource(fn, sig, consts, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled.asm["cubin"]


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def disassemble(cubin: bytes) -> tuple[list[tuple[int, str]], int, int]:
    """([(address, instruction)], registers, local bytes per thread) of a one-function cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvidia_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True)
        res = subprocess.run([nvidia_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True)
    instrs = [(int(a, 16), ins.strip()) for a, ins in SASS_LINE.findall(sass.stdout)]
    regs = int(re.search(r"REG:(\d+)", res.stdout).group(1))
    local = int(re.search(r"LOCAL:(\d+)", res.stdout).group(1))
    return instrs, regs, local


def hot_loop(instrs: list[tuple[int, str]]) -> list[str]:
    """The instructions of the largest innermost loop (from a backward branch's target to the branch,
    with no other backward branch inside), NOPs out."""
    loops = []
    for addr, ins in instrs:
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", ins)
        if m and int(m.group(1), 16) <= addr:
            loops.append((int(m.group(1), 16), addr))
    best: list[str] = []
    for start, end in loops:
        if any(start <= s and e < end for s, e in loops if (s, e) != (start, end)):
            continue  # an outer loop
        body = [s for a, s in instrs if start <= a <= end and not s.startswith("NOP")]
        best = max(best, body, key=len)
    return best


def analyse(case: Case, arch: int) -> dict:
    instrs, regs, local = disassemble(compile_cubin(case, arch))
    loop = [s for _, s in instrs if not s.startswith("NOP")] if case.whole_program else hot_loop(instrs)
    per_weight = len(loop) * case.num_warps * 32 / case.weights_per_iter
    return dict(
        kernel=case.kernel,
        format=case.format,
        M=case.M,
        config=case.config,
        arch=f"sm_{arch}",
        sass_per_weight=round(per_weight, 2),
        registers=regs,
        spills=local,
        loop_instructions=len(loop),
    )


def table(rows: list[dict]) -> str:
    cols = ["kernel", "format", "M", "config", "arch", "sass_per_weight", "registers", "spills",
            "launches_per_call"]  # fmt: skip
    head = ["kernel", "format", "M", "config", "arch", "sass/w", "regs", "spills", "launches"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
