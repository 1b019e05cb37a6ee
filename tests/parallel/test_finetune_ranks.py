"""Fine-tuning under two gloo processes (DistributedDataParallel) equals the one-process run.

Each rank trains on its share of every step's batch (the global batch unchanged) and DDP averages the
gradients, so the two runs differ only in the order in which fp32 sums are taken: a batch's per-token
losses and gradients are summed per rank and then over the ranks instead of in one sum. Measured on this
test: the trained low-rank factors (lora) differ by up to 2e-6 relative to their largest entry after four
AdamW steps, the logits by 4e-7; the batch losses by 1e-7 relative for cross-entropy and up to 3e-5 for
the distillation's KL divergence, a small difference of nearly equal terms (about 1e-3 here) whose
relative error is larger. So the factors are compared within rtol 1e-4, the losses within rtol 1e-4 and
the logits within 1e-5, all far below what one step changes (lr 1e-2). Codes and float16 scales are
rounded from trained tensors, so in general a rare one may land in the neighbouring cell (none did here):
the quantized models are compared by their logits. Within one job every rank ends with the same tensors
bit for bit, and a killed two-process run resumes to the same tensors bit for bit (same reduction order).
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.compress.api import compress as compress_model
from lowbit.compress.finetune import FinetuneConfig, FinetuneError, finetune
from lowbit.compress.recipe import Recipe
from lowbit.parallel import World, world
from tests.compress.test_finetune import BLOCKS, VOCAB, compress
from tests.conftest import make_tiny_llama

# lora on next-token CE; l4q distilling the teacher with the hidden-state term, on a batch of 3 that
# splits unevenly over two ranks (2 + 1 blocks)
RUNS = {
    "lora": dict(mode="lora", objective="lm", batch_size=4),
    "l4q": dict(mode="l4q", hidden_weight=0.5, batch_size=3),
}
PROBE = BLOCKS[:3]
# the pipeline: round to nearest, then PEQA trains the scales against the original model
RECIPE = {
    "quantize": {"format": "int4", "group_size": 32},
    "finetune": dict(mode="peqa", steps=2, batch_size=2, seq_len=16, eval_blocks=0, warmup=0, scale_lr=1e-3),
}


def _config(name: str) -> FinetuneConfig:
    base = dict(steps=4, lr=1e-2, scale_lr=1e-3, seq_len=16, eval_blocks=3, eval_every=2, warmup=0)
    return FinetuneConfig(**{**base, **RUNS[name]})


def _models():
    teacher = make_tiny_llama(VOCAB)
    return teacher, compress(copy.deepcopy(teacher))


def _write(path, model, report) -> None:
    """The fine-tuned model's tensors, its logits on PROBE and the report's losses."""
    with torch.no_grad():
        tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        tensors["probe.logits"] = model(input_ids=PROBE, use_cache=False).logits
    save_file(tensors, str(path) + ".safetensors")
    (path.parent / (path.name + ".json")).write_text(
        json.dumps({"losses": report.losses, "evals": report.evals})
    )


class Stop(Exception):
    pass


def _stop_at_3(step: int, loss: float) -> None:
    if step == 3:
        raise Stop


def _finetune_on_rank(rank: int, root) -> None:
    assert world() == World(rank, 2)
    for name in RUNS:
        teacher, student = _models()
        state = root / "state" / name
        report = finetune(
            student, teacher, config=_config(name), blocks=BLOCKS, state_dir=state, progress=False
        )
        _write(root / "two" / f"{name}-rank{rank}", student, report)
    # a run stopped after step 3 (its state saved at step 2) resumes to the uninterrupted run's tensors
    teacher, student = _models()
    config = FinetuneConfig(**{**_config("lora").to_dict(), "save_every": 2})
    with pytest.raises(Stop):
        finetune(
            student, teacher, config=config, blocks=BLOCKS, state_dir=root / "killed", callback=_stop_at_3
        )
    report = finetune(
        student, teacher, config=config, blocks=BLOCKS, state_dir=root / "killed", progress=False
    )
    assert report.start_step == 2
    _write(root / "two" / f"resumed-rank{rank}", student, report)
    compress_model(make_tiny_llama(VOCAB), Recipe.from_dict(RECIPE), root / "two" / "job", calib_data=BLOCKS)
    with pytest.raises(FinetuneError, match="number of processes"):
        finetune(student, teacher, config=FinetuneConfig(mode="lora", batch_size=1), blocks=BLOCKS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, spawn_module):
    root = tmp_path_factory.mktemp("finetune-ranks")
    (root / "one").mkdir()
    (root / "two").mkdir()
    for name in RUNS:
        teacher, student = _models()
        report = finetune(student, teacher, config=_config(name), blocks=BLOCKS, progress=False)
        _write(root / "one" / name, student, report)
    compress_model(make_tiny_llama(VOCAB), Recipe.from_dict(RECIPE), root / "one" / "job", calib_data=BLOCKS)
    spawn_module(_finetune_on_rank, 2, root)
    return root


def _read(root, name):
    return load_file(str(root / f"{name}.safetensors")), json.loads((root / f"{name}.json").read_text())


@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_processes_equal_one(runs, name):
    one, one_log = _read(runs / "one", name)
    two, two_log = _read(runs / "two", f"{name}-rank0")
    other, other_log = _read(runs / "two", f"{name}-rank1")
    assert two_log == other_log and two.keys() == other.keys()
    assert all(torch.equal(two[k], other[k]) for k in two)  # every rank holds the same model
    assert one.keys() == two.keys()
    torch.testing.assert_close(two_log["losses"], one_log["losses"], rtol=1e-4, atol=0)
    torch.testing.assert_close(two_log["evals"], one_log["evals"], rtol=1e-4, atol=0)
    for k in one:
        if one[k].is_floating_point() and k.endswith((".l1", ".l2")):
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6, msg=k)
    torch.testing.assert_close(two["probe.logits"], one["probe.logits"], rtol=0, atol=1e-5)
    assert not torch.equal(one["probe.logits"], _models()[1](input_ids=PROBE).logits.detach())


def test_killed_two_process_run_resumes_identically(runs):
    resumed, resumed_log = _read(runs / "two", "resumed-rank0")
    whole, whole_log = _read(runs / "two", "lora-rank0")
    assert resumed_log == whole_log
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_compress_fine_tunes_under_two_processes(runs):
    one, two = (lowbit.load(runs / n / "job") for n in ("one", "two"))
    with torch.no_grad():
        torch.testing.assert_close(two(PROBE).logits, one(PROBE).logits, rtol=0, atol=1e-5)
