"""Imports flow one way: quantizers at the bottom; lowrank and kernels use quantizers; calibration
stands alone; compress uses everything; nothing imports compress."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lowbit"
ALLOWED = {
    "quantizers": {"quantizers"},
    "lowrank": {"quantizers", "lowrank"},
    "kernels": {"quantizers", "kernels"},
    "calibration": {"calibration"},
    "compress": {"quantizers", "lowrank", "kernels", "calibration", "compress"},
}


def lowbit_imports(path: Path) -> set[str]:
    """Sub-packages of lowbit that a module imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for n in names:
            parts = n.split(".")
            if parts[0] == "lowbit":
                found.add(parts[1] if len(parts) > 1 else "<top>")
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = lowbit_imports(path) - ALLOWED[package]
        assert not bad, f"{path.relative_to(ROOT)} imports lowbit.{bad}"
