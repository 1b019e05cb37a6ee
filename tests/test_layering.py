"""Imports flow one way, and no module of lowbit imports itself back through others.

Layers, bottom up: parallel (process groups) and quantizers; lowrank, kernels and calibration above
them; nn (the runtime) above those; models (source-model loading); compress (the pipeline) and export
(deployable targets) side by side; eval; the CLI on top, which nothing imports. Every import counts,
lazy ones inside functions included, except those under `if TYPE_CHECKING:` (annotations only; they
never run).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lowbit"
ALLOWED = {
    "parallel": {"parallel"},
    "quantizers": {"quantizers"},
    "lowrank": {"quantizers", "lowrank"},
    "kernels": {"quantizers", "kernels"},
    "calibration": {"parallel", "calibration"},
    "nn": {"quantizers", "kernels", "nn"},
    "models": {"nn", "models"},
    "compress": {"parallel", "quantizers", "lowrank", "kernels", "calibration", "nn", "models", "compress"},
    "export": {"quantizers", "nn", "models", "export"},
    "eval": {"quantizers", "calibration", "nn", "models", "compress", "export", "eval"},
}


def module_name(path: Path) -> str:
    parts = ("lowbit", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST):
    """Every node of the tree except the bodies of `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in (child, *runtime_nodes(child)))
            continue
        yield node
        yield from runtime_nodes(node)


def imported_modules(path: Path) -> set[str]:
    """Modules of lowbit that the file imports at run time (for `from pkg import name`, pkg.name when it is
    a module)."""
    known = {module_name(p) for p in ROOT.rglob("*.py")}
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lowbit")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowbit"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or {node.module}
    return found


def subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<top>"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = {subpackage(m) for m in imported_modules(path)} - ALLOWED[package]
        assert not bad, f"{path.relative_to(ROOT)} imports lowbit.{bad}"


def test_every_package_has_a_layer():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(ALLOWED)


def test_nothing_imports_the_cli():
    for path in sorted(ROOT.rglob("*.py")):
        if path.name != "cli.py":
            assert "lowbit.cli" not in imported_modules(path), f"{path.relative_to(ROOT)} imports the CLI"


def test_no_import_circles():
    """Module-level graph over every lowbit module: a package's __init__ re-exporting its modules is an
    edge like any other, so a module importing its own package's __init__ back is a circle too."""
    graph = {module_name(p): imported_modules(p) for p in ROOT.rglob("*.py")}
    graph["lowbit"] = set()  # the top-level API imports everything; nothing below may import it
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n] if n in stack else [m, n]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
