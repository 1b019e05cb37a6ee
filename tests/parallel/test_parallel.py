import itertools

import pytest
import torch

from lowbit.calibration.stats import LayerStats, reduce_stats
from lowbit.parallel import ParallelError, World, broadcast_tensors, owners, share, world


@pytest.mark.parametrize("n,size", [(0, 1), (7, 1), (7, 2), (8, 3), (2, 4), (100, 7)])
def test_shares_are_the_samples_in_order(n, size):
    parts = [share(n, World(rank, size)) for rank in range(size)]
    assert [i for p in parts for i in range(n)[p]] == list(range(n))
    lengths = [p.stop - p.start for p in parts]
    assert max(lengths) - min(lengths) <= 1


def _best_makespan(costs: list[float], size: int) -> float:
    best = float("inf")
    for assign in itertools.product(range(size), repeat=len(costs)):
        loads = [0.0] * size
        for c, r in zip(costs, assign, strict=True):
            loads[r] += c
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_owners_balance_within_graham_bound(seed):
    g = torch.Generator().manual_seed(seed)
    costs = {f"l{i}": float(c) for i, c in enumerate(torch.randint(1, 50, (7,), generator=g))}
    size = 2 + seed % 2
    got = owners(costs, size)
    assert set(got) == set(costs) and set(got.values()) <= set(range(size))
    loads = [sum(c for k, c in costs.items() if got[k] == r) for r in range(size)]
    assert max(loads) <= 4 / 3 * _best_makespan(list(costs.values()), size) + 1e-9
    assert owners(dict(reversed(costs.items())), size) == got  # the same on every rank


def test_owners_refuses_no_ranks():
    with pytest.raises(ParallelError, match="size"):
        owners({"a": 1.0}, 0)


def test_one_process_is_the_identity():
    assert world() == World(0, 1, "cpu")
    t = {"a": torch.ones(2)}
    assert broadcast_tensors(t, {"k": 1}, 0, World())[0] is t


def _stats_of(x: torch.Tensor) -> LayerStats:
    st = LayerStats()
    for chunk in x.split(3):
        st.update(chunk, ("act", "hessian"))
    return st


def _reduce_and_broadcast(rank: int, x: torch.Tensor) -> None:
    w = world()
    assert (w.rank, w.size) == (rank, 2)
    mine = _stats_of(x[share(len(x), w)])
    reduce_stats({"layer": mine}, w)
    whole = _stats_of(x)
    assert mine.tokens == whole.tokens
    assert torch.equal(mine.act_max, whole.act_max)
    torch.testing.assert_close(mine.act_sqmean, whole.act_sqmean, rtol=1e-6, atol=0)
    torch.testing.assert_close(mine.hessian, whole.hessian, rtol=1e-5, atol=1e-5)

    sent = {"codes": torch.arange(6, dtype=torch.uint8).reshape(2, 3) + rank, "s": torch.randn(4)}
    got, meta = broadcast_tensors(sent if rank == 1 else None, {"from": rank} if rank == 1 else None, 1, w)
    assert meta == {"from": 1}
    assert torch.equal(got["codes"], torch.arange(6, dtype=torch.uint8).reshape(2, 3) + 1)
    expected = got["s"].clone()  # what rank 1 sent, checked on both sides below
    if rank == 1:
        assert got is sent
    gathered = [torch.empty(4) for _ in range(2)]
    torch.distributed.all_gather(gathered, expected)
    assert torch.equal(gathered[0], gathered[1])


def test_two_ranks_reduce_statistics_and_share_tensors(spawn):
    x = torch.randn(2, 10, 5, generator=torch.Generator().manual_seed(0)) * 3  # [tokens..., K]
    spawn(_reduce_and_broadcast, 2, x.reshape(20, 5))


def _reduce_shared(rank: int, x: torch.Tensor) -> None:
    w = world()
    lead = _stats_of(x[share(len(x), w)])
    follower = LayerStats(lead.act_max, lead.act_sqmean, lead.hessian, lead.tokens)  # q and k, say
    reduce_stats({"q": lead, "k": follower}, w)
    whole = _stats_of(x)
    for st in (lead, follower):
        assert st.tokens == whole.tokens
        torch.testing.assert_close(st.hessian, whole.hessian, rtol=1e-5, atol=1e-5)  # summed once
        torch.testing.assert_close(st.act_sqmean, whole.act_sqmean, rtol=1e-6, atol=0)


def test_two_ranks_reduce_shared_statistics_once(spawn):
    x = torch.randn(21, 4, generator=torch.Generator().manual_seed(1))
    spawn(_reduce_shared, 2, x)
