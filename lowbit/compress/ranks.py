"""Layer work split over the job's processes: each layer compressed by one owner rank, the result
broadcast, so every rank ends with the same model bit for bit (see `lowbit.parallel`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import nn

from lowbit.nn.qlinear import QLinear
from lowbit.parallel import World, broadcast_tensors, owners


def layer_cost(shape) -> float:
    """The relative cost of one layer's work, for a weight [N, K]: N K (K + min(N, K)), its products with
    the [K, K] Hessian (GPTQ's updates, the table's output errors) and its truncated SVD (the low-rank
    part). By weight size alone (N K) the 0.5B shape's down_proj [896, 4864] cost as much as its up_proj
    [4864, 896]; its rows of the error table took about 3.4x as long (measured, two processes; this
    model says 3.2x)."""
    n, k = (int(d) for d in shape)
    return float(n * k * (k + min(n, k)))


def layer_owners(model: nn.Module, names: list[str], w: World) -> dict[str, int]:
    """{name: rank}: the owner of each dense layer `names` of `model`, balanced by `layer_cost`."""
    return owners({name: layer_cost(model.get_submodule(name).weight.shape) for name in names}, w.size)


def build_owned(
    model: nn.Module, names: list[str], build: Callable[[str], QLinear], w: World
) -> Iterator[tuple[str, QLinear]]:
    """(name, build(name)) for the dense layers `names` of `model` in order, each built on one rank only.

    Owners are balanced by `layer_cost`; every rank first builds its own layers, then each is broadcast
    from its owner in the order of `names`. One process builds each layer when its turn comes, so the
    caller can free the original before the next is built."""
    if w.size == 1:
        yield from ((name, build(name)) for name in names)
        return
    own = layer_owners(model, names, w)
    yield from shared(model, names, own, {name: build(name) for name in names if own[name] == w.rank}, w)


def shared(
    model: nn.Module, names: list[str], own: dict[str, int], mine: dict[str, QLinear], w: World
) -> Iterator[tuple[str, QLinear]]:
    """(name, layer) for the dense layers `names` of `model` in order, each broadcast from its owner
    own[name]; `mine` holds the layers this rank built (each taken out of it once sent)."""
    for name in names:
        q = mine.pop(name, None)
        sent = (None, None) if q is None else (dict(q.state_dict()), {**q.layer_plan(), "backend": q.backend})
        tensors, plan = broadcast_tensors(*sent, own[name], w)
        if q is None:
            weight = model.get_submodule(name).weight  # the dense layer this rank replaces
            q = QLinear.from_plan(plan, weight.dtype, weight.device, plan["backend"])
            q.load_state_dict(tensors)
        yield name, q
