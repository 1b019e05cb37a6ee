"""Calibration hidden states past the memory limit go to disk and come back bit for bit: the
block-by-block runner gives the same statistics and the same modified model with any limit."""

import pytest
import torch

from lowbit.calibration import CalibrationError, calibrate_sequential
from lowbit.calibration.hidden import HiddenStates
from tests.calibration.test_sequential import tiny, tokens


def test_states_past_the_limit_are_files_read_back_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 8, generator=g).to(torch.bfloat16) for _ in range(3)]
    with HiddenStates(limit=xs[0].nbytes, folder=tmp_path) as h:
        for x in xs:
            h.append(x)
        assert len(h) == 3 and h.offloaded == 2 and h[0] is xs[0]  # the first fits in memory
        (folder,) = tmp_path.iterdir()
        assert len(list(folder.glob("*.safetensors"))) == 2
        assert all(torch.equal(h[j], x) and h[j].dtype == torch.bfloat16 for j, x in enumerate(xs))
        y = torch.randn(2, 5, 8, generator=g).to(torch.bfloat16)
        h[2] = y  # a block's output replaces its input
        assert torch.equal(h[2], y) and torch.equal(h[1], xs[1])
        with pytest.raises(CalibrationError, match="micro-batch 1"):
            h[1] = torch.zeros(2, 5, 8)
        with pytest.raises(IndexError):
            h[3]
    assert not any(tmp_path.iterdir())  # the files are removed
    with HiddenStates() as h:
        h.append(xs[0])
        assert h.offloaded == 0 and h.dir is None  # no limit: nothing written
    with pytest.raises(CalibrationError, match=">= 0"):
        HiddenStates(-1)


class Halve:
    """on_block: halve one linear's weight per block (the next block sees the modified outputs) and count
    the hidden-state files that exist meanwhile."""

    def __init__(self, folder):
        self.folder, self.files = folder, []

    def __call__(self, index, block, block_stats):
        block.mlp.down_proj.weight.data.mul_(0.5)
        self.files.append(len(list(self.folder.glob("*/*.safetensors"))))


@pytest.mark.parametrize("limit, on_disk", [(None, 0), (10_000, 2), (0, 3)])
def test_offloaded_runs_equal_the_in_memory_run(tmp_path, limit, on_disk):
    data = tokens(5, 16)  # micro-batches of 2, 2 and 1 samples: [2, 16, 64] fp32 is 8192 bytes
    runs = []
    for offload in (None, limit):
        model = tiny()
        spy = Halve(tmp_path)
        job = dict(batch_size=2, offload_bytes=offload, offload_dir=tmp_path, progress=False)
        stats = calibrate_sequential(model, data, on_block=spy, **job)
        runs.append((model, stats, spy.files))
    (ref, ref_stats, _), (model, stats, files) = runs
    assert files == [on_disk, on_disk] and not any(tmp_path.iterdir())
    assert stats.keys() == ref_stats.keys()
    for name, st in stats.items():
        ref_st = ref_stats[name]
        assert st.tokens == ref_st.tokens
        for field in ("act_max", "act_sqmean", "hessian"):
            assert torch.equal(getattr(st, field), getattr(ref_st, field)), (name, field)
    state, ref_state = model.state_dict(), ref.state_dict()
    assert all(torch.equal(t, ref_state[k]) for k, t in state.items())
