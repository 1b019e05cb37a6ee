"""The work area of a budget job: its size reported, removed after success unless kept, kept on failure."""

import pytest

from lowbit.compress.api import compress
from lowbit.compress.budget import compress_to_budgets, work_area
from lowbit.compress.recipe import Recipe
from lowbit.compress.workarea import WorkAreaFull
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


def compress_job(tmp_path, **kw):
    out = tmp_path / "out"
    job = dict(budget=3.0, work_dir=tmp_path / "work", overwrite=True, progress=False)
    return compress(make_tiny_llama(300), RECIPE, out, **job, **kw)


def test_compress_removes_its_work_area_after_success_unless_asked_to_keep_it(tmp_path):
    _, report = compress_job(tmp_path)
    assert report.budgets[0]["work_bytes"] > 0 and not (tmp_path / "work").exists()
    _, report = compress_job(tmp_path, keep_work=True)
    (area,) = (tmp_path / "work").iterdir()
    assert sum(f.stat().st_size for f in area.rglob("*") if f.is_file()) == report.budgets[0]["work_bytes"]


def test_a_work_area_past_its_size_limit_stops_the_job_and_is_kept(tmp_path):
    with pytest.raises(WorkAreaFull, match=r"holds \d+\.\d\d GB, over its limit of 0\.00 GB"):
        compress_job(tmp_path, max_work_size=1000)
    assert issubclass(WorkAreaFull, ValueError) and not (tmp_path / "out").exists()
    assert any((tmp_path / "work").rglob("*.safetensors"))  # kept: the job resumes
    compress_job(tmp_path, max_work_size="1GB")
    assert (tmp_path / "out" / "lowbit_config.json").is_file() and not (tmp_path / "work").exists()
