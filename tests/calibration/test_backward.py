"""The block-by-block Fisher diagonal equals the whole-model one, and resumes after the blocks it saved."""

import torch

from lowbit.calibration.backward import calibrate_backward
from lowbit.calibration.stats import fisher_diagonal
from tests.conftest import make_tiny_llama

DATA = torch.randint(0, 300, (5, 20), generator=torch.Generator().manual_seed(0))


def block_fisher(model, directory, **kw) -> dict:
    got = {}

    def keep(index, block, stats):
        got.update({name: st for name, st in stats.items()})

    calibrate_backward(model, DATA, directory, on_block=keep, progress=False, **kw)
    return got


def test_block_by_block_fisher_equals_the_whole_model_backward(tmp_path):
    model = make_tiny_llama(300, num_hidden_layers=3)
    ref = fisher_diagonal(model, DATA, progress=False)
    got = block_fisher(model, tmp_path)
    assert got.keys() == ref.keys()
    for name, st in got.items():
        assert torch.equal(st.fisher, ref[name]), name  # the same chain rule, the same roundings
        assert st.fisher_samples == DATA.shape[0] and st.hessian is not None
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # left as it was


def test_a_resumed_backward_starts_below_the_last_block_it_finished(tmp_path):
    model = make_tiny_llama(300, num_hidden_layers=3)
    full = block_fisher(model, tmp_path / "a")
    seen = []

    def stop(index, block, stats):
        seen.append(index)
        if index == 1:
            raise KeyboardInterrupt  # a kill once block 2 is saved

    try:
        calibrate_backward(model, DATA, tmp_path / "b", on_block=stop, progress=False)
    except KeyboardInterrupt:
        pass
    again = block_fisher(model, tmp_path / "b")
    assert seen == [2, 1] and set(again) == {n for n in full if ".layers.2." not in n}
    for name, st in again.items():
        assert torch.equal(st.fisher, full[name].fisher), name


def test_the_head_backward_in_chunks_of_positions_gives_the_same_fisher(tmp_path, monkeypatch):
    """The last block's backward from the loss runs through the lm_head a few positions at a time (3 here):
    each position's gradient comes from its own chunk alone, so the Fisher is the one-chunk Fisher."""
    from lowbit.calibration import backward

    model = make_tiny_llama(300, num_hidden_layers=2)
    whole = block_fisher(model, tmp_path / "a")
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1].numel()))
    monkeypatch.setattr(backward, "HEAD_CHUNK_BYTES", 4 * 300 * 3)
    chunked = block_fisher(model, tmp_path / "b")
    assert max(seen) == 3 and len(seen) == DATA.shape[0] * 7  # 19 positions: 6 chunks of 3 and one of 1
    for name, st in chunked.items():
        torch.testing.assert_close(st.fisher, whole[name].fisher, rtol=1e-5, atol=0)
