"""Layer work split over the job's processes: each layer compressed by one owner rank, the result
broadcast, so every rank ends with the same model bit for bit (see `lowbit.parallel`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import nn

from lowbit.nn.qlinear import QLinear
from lowbit.parallel import World, broadcast_tensors, owners


def build_owned(
    model: nn.Module, names: list[str], build: Callable[[str], QLinear], w: World
) -> Iterator[tuple[str, QLinear]]:
    """(name, build(name)) for the dense layers `names` of `model` in order, each built on one rank only.

    Owners are balanced by weight size (the cost of GPTQ and of a decomposition grows with N K at a
    fixed K); every rank first builds its own layers, then each is broadcast from its owner in the
    order of `names`. One process builds each layer when its turn comes, so the caller can free the
    original before the next is built."""
    if w.size == 1:
        yield from ((name, build(name)) for name in names)
        return
    own = owners({name: float(model.get_submodule(name).weight.numel()) for name in names}, w.size)
    mine = {name: build(name) for name in names if own[name] == w.rank}
    for name in names:
        q = mine.pop(name, None)
        sent = (None, None) if q is None else (dict(q.state_dict()), {**q.layer_plan(), "backend": q.backend})
        tensors, plan = broadcast_tensors(*sent, own[name], w)
        if q is None:
            weight = model.get_submodule(name).weight  # the dense layer this rank replaces
            q = QLinear.from_plan(plan, weight.dtype, weight.device, plan["backend"])
            q.load_state_dict(tensors)
        yield name, q
