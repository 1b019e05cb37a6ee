"""The budget path under two gloo processes equals the one-process run: the statistics and the Fisher
summed over the processes' samples, each layer's table row and allocated layer computed by one owner and
broadcast, rank 0 solving the allocation and writing; for a model in memory and for a streamed folder
(with probes and the check: each measured model by one process), the allocated layers built on the
quantized blocks' outputs one block at a time, and for the streamed folder also on the float inputs in
windows of blocks."""

import pytest
import torch
from safetensors.torch import load_file

from lowbit.compress.api import compress
from lowbit.compress.recipe import Recipe
from lowbit.nn.manifest import read_manifest
from tests.conftest import NEWS, make_tiny_llama, make_tokenizer

SEQ = 16
RECIPE = {
    "quantize": {"rounding": "gptq"},
    "allocate": {
        "formats": ["int"],
        "bits": [2, 3, 4],
        "group_sizes": [32],
        "ranks": [0, 4],
        "rounding": "nearest",
    },
    "decompose": {"method": "lorc"},
    "calibration": {"samples": 8, "seq_len": SEQ},
}
# probes and the check measured block by block, each model measured by one process
LOSSES = {**RECIPE, "allocate": {**RECIPE["allocate"], "probes": 2, "check": True}}
# the allocated layers built on the float inputs: two processes build windows of two blocks
ORIGINAL = {**RECIPE, "allocate": {**RECIPE["allocate"], "propagate": "original"}}
SOURCES = ("memory", "streamed", "streamed-losses")


def _blocks() -> torch.Tensor:
    return torch.randint(0, 300, (8, SEQ), generator=torch.Generator().manual_seed(0))


def _run(name: str, folder, out) -> None:
    source = make_tiny_llama(300) if name == "memory" else str(folder)
    recipe = Recipe.from_dict({"streamed-losses": LOSSES, "streamed": ORIGINAL}.get(name, RECIPE))
    compress(source, recipe, out, calib_data=_blocks(), budget=3.0, progress=False)


def _on_rank(rank: int, root, folder) -> None:
    for name in SOURCES:
        _run(name, folder, root / name / "two")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny Llama, with three blocks, saved as a folder, which the streamed runs read one block at a
    time: two processes build its layers in windows of two blocks and one (`blocks_at_once`)."""
    path = tmp_path_factory.mktemp("source")
    make_tiny_llama(300, num_hidden_layers=3).save_pretrained(path)
    make_tokenizer(NEWS).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, spawn_module, folder):
    """root/<source>/one (one process) and root/<source>/two (two processes)."""
    root = tmp_path_factory.mktemp("budget-ranks")
    for name in SOURCES:
        _run(name, folder, root / name / "one")
    spawn_module(_on_rank, 2, root, folder)
    return root


@pytest.mark.parametrize("name", SOURCES)
def test_two_processes_equal_one(runs, name):
    one, two = (runs / name / n for n in ("one", "two"))
    assert read_manifest(one)["layers"] == read_manifest(two)["layers"]  # the same allocation
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    # statistics summed in another order (about 1e-7 relative): GPTQ rounds almost every weight alike
    codes = [k for k in a if k.endswith(".codes")]
    same = sum(int((a[k] == b[k]).sum()) for k in codes) / sum(a[k].numel() for k in codes)
    assert same > 0.999
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("model.layers."))
