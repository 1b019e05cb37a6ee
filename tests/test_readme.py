"""Every Python code block and every command of the README's bash blocks runs as printed.

The default run swaps the built-in model and text for a tiny random Llama and a small local text (the
same calls, seconds instead of minutes); the slow runs execute the Python blocks and the commands of
"Command line" and "Export" exactly as printed on the built-in SmolLM2-135M and the Lee news corpus
(the budget commands take about 9 minutes each there; the tiny run covers them). Not run: `make demo`
(pip install, then the printed `--budget 3.25` command) and `make test` (this suite).
"""

import os
import re
import shlex
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


def bash_commands() -> list[str]:
    """The commands of the README's bash blocks in order: continuation lines joined, trailing comments
    dropped, a command printed twice run once, `make` lines left out (see the module docstring)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s+#", line)[0].strip()
            if line and not line.startswith("make ") and line not in commands:
                commands.append(line)
    return commands


def readme_recipe() -> str:
    return re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)[0]


def run_commands(commands: list[str], cwd: Path, swap: dict[str, str], model: str | None = None) -> None:
    """Run each command through the CLI's main in `cwd`, words swapped by `swap`; with `model` (a tiny
    run), a `compress` that names no model gets it (the default is the built-in one) and evaluations are
    capped at 2,048 held-out tokens."""
    from lowbit.cli import main

    os.chdir(cwd)
    for command in commands:
        argv = [swap.get(w, w) for w in shlex.split(command)]
        assert argv[0] == "lowbit", command
        if model and "--nproc" in argv:  # two processes are enough to run the command here
            argv[argv.index("--nproc") + 1] = "2"
        if model and argv[1] == "compress" and "--model" not in argv:
            argv[2:2] = ["--model", model]
        if model and argv[1] == "compress" and {"--eval", "--eval-data", "--budgets"} & set(argv):
            argv += ["--eval-tokens", "2048"]
        if model and argv[1] == "eval" and "--tokens" not in argv:
            argv += ["--tokens", "2048"]
        try:
            code = main(argv[1:])
        except SystemExit as e:  # --version and --help exit through argparse
            code = e.code
        assert code == 0, f"README command failed: {command}"


def test_readme_has_bash_commands():
    commands = bash_commands()
    assert any("--to compressed-tensors" in c for c in commands) and any("--to gguf" in c for c in commands)
    assert all(c.startswith("lowbit") for c in commands)


def test_bash_commands_run_on_a_tiny_model(news_file, tmp_path, monkeypatch):
    """Every README command, on a tiny Llama with a byte-level vocabulary (llama.cpp needs every byte)."""
    from tests.conftest import make_tiny_llama
    from tests.export.test_gguf_export import byte_tokenizer

    model, tok = tmp_path / "tiny", byte_tokenizer()  # MLP width 192: groups of 64 divide it, as for vLLM
    make_tiny_llama(len(tok), intermediate_size=192).save_pretrained(model)
    tok.save_pretrained(model)
    (tmp_path / "recipe.yaml").write_text(readme_recipe())
    monkeypatch.chdir(tmp_path)
    swap = {"smollm2-135m": str(model), "./my-hf-model": str(model), "wikitext2": str(news_file)}
    swap |= {"./Llama-3.1-8B": str(model), "cuda": "cpu"}  # no 8B model and no GPU here
    run_commands(bash_commands(), tmp_path, swap, model=str(model))
    for folder in (
        "out/int4-ct",
        "out/int4-gguf",
        "out/int4-dense",
        "out/b325",
        "out/pareto/bpw-2.5",
        "out/8b-gptq-8",
    ):
        assert (tmp_path / folder).is_dir(), folder


@pytest.mark.slow
def test_command_line_and_export_commands_run_as_printed(tmp_path, monkeypatch):
    """The "Command line" and "Export" commands on the built-in model (README's recipe.yaml; the hub
    dataset wikitext2 and ./my-hf-model swapped for the built-in text and model: no network here)."""
    pytest.importorskip("gensim", reason="the built-in text comes from the gensim wheel")
    commands = [c for c in bash_commands() if not any(w in c for w in ("alloc-int", "int3", "Llama-3.1-8B"))]
    (tmp_path / "recipe.yaml").write_text(readme_recipe())
    monkeypatch.chdir(tmp_path)
    run_commands(commands, tmp_path, {"./my-hf-model": "smollm2-135m", "wikitext2": "builtin:lee-news"})
