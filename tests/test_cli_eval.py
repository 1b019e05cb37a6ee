"""`lowbit compress --eval-data`: held-out perplexity on several texts side by side, each round-to-nearest
baseline compressed once, and bad input refused before a weight is read."""

import json
from pathlib import Path

import pytest

import lowbit.eval.compare as comparison
from lowbit.cli import main, print_text
from lowbit.compress import api
from lowbit.compress.presets import preset

RECIPES = [  # another domain than the fixtures' news text: its own perplexities
    "Whisk two eggs with a pinch of salt, then fold in the flour until the batter is smooth.",
    "Simmer the onions in butter over a low heat for twenty minutes, stirring now and then.",
    "Roast the peppers until their skins blacken, cool them in a covered bowl and peel them.",
]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def recipes_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "recipes.txt"
    path.write_text("\n\n".join(RECIPES * 8))
    return path


@pytest.fixture
def compress_calls(monkeypatch) -> list:
    """The recipes the comparison compresses (its round-to-nearest baselines), in call order."""
    calls = []

    def counted(model, recipe, *args, **kwargs):
        calls.append(recipe)
        return api.compress(model, recipe, *args, **kwargs)

    monkeypatch.setattr(comparison, "compress", counted)
    return calls


def numbers(e: dict) -> dict:
    return {k: e[k] for k in ("data", "tokens", "perplexity", "bits_per_weight")}


def test_two_texts_side_by_side(capsys, tiny_llama_dir, news_file, recipes_file, tmp_path, compress_calls):
    argv = ["compress", "--model", tiny_llama_dir, "--preset", "int4-g128", "--eval-tokens", 64, "--json"]
    code, stdout, err = run(
        capsys, *argv, "--out", tmp_path / "a", "--eval-data", f"{news_file},{recipes_file}"
    )
    assert code == 0, err
    r = json.loads(stdout)
    assert compress_calls == [preset("int4-g128")]  # the nearest baseline, compressed once for both texts
    news, recipes = r["eval"]
    assert (news["data"], recipes["data"]) == (str(news_file), str(recipes_file))
    for key in ("original", "compressed"):
        assert news[key]["bits_per_weight"] == recipes[key]["bits_per_weight"]
        assert news[key]["perplexity"] != recipes[key]["perplexity"]
        assert (news[key]["data"], recipes[key]["data"]) == (news["data"], recipes["data"])
    assert news["rtn"].keys() == recipes["rtn"].keys() == {"int4-g128"}
    assert news["rtn"]["int4-g128"]["bits_per_weight"] == recipes["rtn"]["int4-g128"]["bits_per_weight"]
    assert all(r[k] == news[k] for k in ("original", "compressed", "rtn"))  # the first text's, as before

    # without --eval-data, evaluating on --data: today's keys, the same numbers as the first text's
    code, stdout, err = run(capsys, *argv, "--out", tmp_path / "b", "--eval", "--data", news_file)
    assert code == 0, err
    one = json.loads(stdout)
    assert "eval" not in one and compress_calls == [preset("int4-g128")] * 2
    for key in ("original", "compressed"):
        assert numbers(one[key]) == numbers(news[key])
    assert numbers(one["rtn"]["int4-g128"]) == numbers(news["rtn"]["int4-g128"])

    print_text("compress", r)
    text = capsys.readouterr().out
    assert text.count("perplexity on ") == 2 and text.count("  compressed ") == 2
    assert text.index(f"of {news_file}:") < text.index(f"of {recipes_file}:")


def test_several_budgets_per_text_and_the_report_of_the_first(
    capsys, tiny_llama_dir, news_file, recipes_file, tmp_path, compress_calls
):
    outs = {3.25: tmp_path / "int3", 4.25: tmp_path / "int4"}  # stand-ins for two budgets' checkpoints
    for out in outs.values():
        _, report = api.compress(str(tiny_llama_dir), preset(out.name + "-g128"), out, progress=False)
    shapes = [tuple(e["shape"]) for e in report.layers.values()]
    result = {"out": str(tmp_path), "budgets": [{"out": str(o), "budget": b} for b, o in outs.items()]}
    texts = [str(recipes_file), str(news_file)]
    r = comparison.compare(str(tiny_llama_dir), result, texts, shapes, tokens=64, progress=False)
    assert len(compress_calls) == 3  # every baseline once, not once per text
    assert [e["data"] for e in r["eval"]] == texts and r["points"] == r["eval"][0]["points"]
    first, second = ([numbers(p) for p in e["points"]] for e in r["eval"])
    assert [p["bits_per_weight"] for p in first] == [p["bits_per_weight"] for p in second]
    assert all(p["data"] == texts[0] for p in first) and all(p["data"] == texts[1] for p in second)
    assert json.loads((tmp_path / "report.json").read_text())["data"] == texts[0]
    print_text(
        "compress",
        {**result, "bits_per_weight": 4.0, "quantized_params": 1, "size_bytes": 1, "seconds": 1.0, **r},
    )
    lines = capsys.readouterr().out.splitlines()
    headings = [i for i, line in enumerate(lines) if line.startswith("perplexity on ")]
    assert len(headings) == 2
    assert headings[1] - headings[0] == 1 + 1 + 2 + 3  # the heading, original, 2 budgets, 3 baselines
    assert lines[-1].startswith("wrote ") and "report.json" in lines[-1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--eval-data", "builtin:nope"], "unknown built-in text 'builtin:nope'"),
        (["--eval-data", "NEWS,missing.txt"], "text file 'missing.txt' does not exist"),
        (["--eval-data", "NEWS,,NEWS"], "--eval-data must be distinct comma-separated text sources"),
        (["--eval-data", "NEWS,NEWS"], "--eval-data must be distinct comma-separated text sources"),
        (["--eval-data", "NEWS", "--dry-run"], "--eval-data evaluates the written checkpoint"),
        (["--eval-data", "NEWS", "--data", "NEWS"], "--data is not used: --preset int4-g128"),
    ],
)
def test_bad_eval_data_is_refused_before_loading(
    capsys, tiny_llama_dir, news_file, tmp_path, monkeypatch, argv, message
):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(api, "load_model", refuse)
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("NEWS", str(news_file)) for a in argv]
    code, out, err = run(
        capsys, "compress", "--model", tiny_llama_dir, "--preset", "int4-g128", *argv, "--out", "o"
    )
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []
