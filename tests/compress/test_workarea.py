"""The work area of a budget job: its size reported, removed after success unless kept, kept on failure."""

import pytest

from lowbit.compress.budget import compress_to_budgets, work_area
from lowbit.compress.recipe import Recipe
from tests.conftest import make_tiny_llama

RECIPE = Recipe.from_dict(
    {
        "allocate": {
            "formats": ["int"],
            "bits": [2, 4],
            "group_sizes": [32],
            "ranks": [0],
            "metric": "frobenius",
        },
    }
)


def run(tmp_path, keep_work: bool, fail: bool = False):
    model = make_tiny_llama(300)
    out = tmp_path / "out"
    with work_area("tiny", RECIPE, out, None, False, keep_work=keep_work) as work:
        results = compress_to_budgets(model, RECIPE, [3.0], work, outs=[out], progress=False)
        if fail:
            raise RuntimeError("killed")
    return work, results[0]


@pytest.mark.parametrize("keep_work", [False, True])
def test_work_area_size_is_reported_and_removed_unless_kept(tmp_path, keep_work):
    work, result = run(tmp_path, keep_work)
    assert result.work_bytes > 0 and (tmp_path / "out").is_dir()
    assert work.dir.exists() == keep_work and (tmp_path / ".lowbit-work").exists() == keep_work
    if keep_work:
        assert work.size() == result.work_bytes


def test_failed_job_keeps_its_work_area(tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path, keep_work=False, fail=True)
    assert any((tmp_path / ".lowbit-work").rglob("*.safetensors"))
