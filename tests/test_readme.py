"""Every Python code block of the README runs as printed.

The default run swaps the built-in model and text for a tiny random Llama and a small local text (the
same calls, seconds instead of minutes); the slow run executes the blocks exactly as printed on the
built-in SmolLM2-135M and the Lee news corpus.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def run_blocks(cwd: Path, replace: dict[str, str]) -> None:
    for i, block in enumerate(python_blocks()):
        for old, new in replace.items():
            block = block.replace(f'"{old}"', repr(new))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(README.parent)}
        r = subprocess.run([sys.executable, "-c", block], cwd=cwd, capture_output=True, text=True, env=env)
        assert r.returncode == 0, f"README Python block {i} failed:\n{block}\n{r.stderr[-3000:]}"


def test_readme_has_python_blocks():
    blocks = python_blocks()
    assert blocks and any("lowbit.compress(" in b for b in blocks)


def test_python_blocks_run_on_a_tiny_model(tiny_llama_dir, news_file, tmp_path):
    run_blocks(tmp_path, {"smollm2-135m": str(tiny_llama_dir), "builtin:lee-news": str(news_file)})
    assert (tmp_path / "out" / "int4" / "lowbit_config.json").is_file()
    assert (tmp_path / "out" / "b" / "lowbit_config.json").is_file()


@pytest.mark.slow
def test_python_blocks_run_as_printed(tmp_path):
    pytest.importorskip("gensim", reason="the built-in text comes from the gensim wheel")
    run_blocks(tmp_path, {})
