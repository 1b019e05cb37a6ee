"""Per-layer constraints on the allocation: pins, forbidden candidates and minimum bits as a bool mask,
what a serving engine needs (the candidates it serves on each layer, one candidate per fused group), and
ties of every layer of one type to one candidate (`type_groups`, `merge_groups`)."""

from __future__ import annotations

import fnmatch
import logging
import re

import numpy as np

from lowbit.compress.allocate.candidates import AllocationError, Candidate
from lowbit.quantizers.engines import ENGINES, fused_groups

logger = logging.getLogger(__name__)

TIES = ("none", "type")  # allocate.tie: each layer alone, or one candidate per layer type


def constraint_mask(names, candidates, *, pins=None, forbid=(), min_bits=None) -> np.ndarray:
    """bool [M, C]: True where layer names[m] may take candidates[c]. Patterns are fnmatch patterns.

    pins: {pattern: Candidate or predicate dict}: matching layers take only that candidate (or those
    matching the predicate); the first matching pattern wins. forbid: [(pattern, predicate)]: matching
    layers never take a candidate matching the predicate, e.g. ("*.down_proj", {"bits": 2}).
    min_bits: {pattern: b}: matching layers take only candidates with at least b-bit codes.
    A predicate maps PREDICATE_KEYS to a value or a list of allowed values.
    """
    mask = np.ones((len(names), len(candidates)), dtype=bool)

    def rows(pattern: str) -> list[int]:
        hit = [m for m, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            logger.warning("allocation constraint pattern %r matches no layer", pattern)
        return hit

    pinned = np.zeros(len(names), dtype=bool)
    for pattern, pin in (pins or {}).items():
        if isinstance(pin, Candidate) and pin not in candidates:
            raise AllocationError(
                f"candidate {pin.short()} pinned for {pattern!r} is not in the candidate grid"
            )
        if not isinstance(pin, (Candidate, dict)):
            raise AllocationError(f"pin for {pattern!r} must be a Candidate or a predicate dict, got {pin!r}")
        col = np.array([c == pin if isinstance(pin, Candidate) else c.matches(pin) for c in candidates])
        for m in rows(pattern):
            if not pinned[m]:
                mask[m] &= col
                pinned[m] = True
    for entry in forbid or ():
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[1], dict)):
            raise AllocationError(
                f"each forbid entry must be a (pattern, predicate dict) pair, got {entry!r}"
            )
        col = np.array([c.matches(entry[1]) for c in candidates])
        mask[rows(entry[0])] &= ~col
    for pattern, b in (min_bits or {}).items():
        if isinstance(b, bool) or not isinstance(b, int):
            raise AllocationError(f"min_bits for {pattern!r} must be an integer, got {b!r}")
        mask[rows(pattern)] &= np.array([c.spec.bits >= b for c in candidates])
    empty = np.flatnonzero(~mask.any(1))
    if empty.size:
        raise AllocationError(f"the allocation constraints leave layer {names[empty[0]]!r} no candidate")
    return mask


def engine_constraints(names, shapes, candidates, target: str) -> tuple[np.ndarray, list[list[int]]]:
    """(allowed bool [M, C], tied groups of row indices) for a checkpoint served by `target` (a key of
    ENGINES): layer names[m] of shape [N, K] may take candidates[c] when the engine serves its spec on K
    inputs; an engine that runs q/k/v and gate/up as one fused matrix ties each such group."""
    engine = ENGINES[target]
    mask = np.ones((len(names), len(candidates)), dtype=bool)
    if engine.problem is not None:
        for m, (_, k) in enumerate(shapes):
            mask[m] = [engine.problem(c.spec, k) is None for c in candidates]
    empty = np.flatnonzero(~mask.any(1))
    if empty.size:
        m, k = empty[0], shapes[empty[0]][1]
        why = dict.fromkeys(engine.problem(c.spec, k) for c in candidates)  # distinct reasons, in order
        raise AllocationError(
            f"{engine.name} serves none of the candidates on layer {names[m]!r} (K = {k}): {'; '.join(why)}"
        )
    index = {n: m for m, n in enumerate(names)}
    tied = [[index[n] for n in group] for group in fused_groups(names)] if engine.fused else []
    return mask, tied


def layer_type(name: str) -> str:
    """A layer's type: its name without the numbers between dots (model.layers.3.mlp.down_proj and
    model.layers.17.mlp.down_proj are both model.layers.mlp.down_proj)."""
    return re.sub(r"\.\d+(?=\.|$)", "", name)


def type_groups(names) -> list[list[int]]:
    """Row indices of the layers of each type (`layer_type`) that has two or more, in the order of names."""
    groups: dict[str, list[int]] = {}
    for m, n in enumerate(names):
        groups.setdefault(layer_type(n), []).append(m)
    return [g for g in groups.values() if len(g) > 1]


def merge_groups(groups) -> list[list[int]]:
    """Overlapping groups of row indices joined (union-find): the ties of two constraints at once, each
    row in at most one group, groups in the order of their smallest row and rows sorted."""
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        while parent.setdefault(i, i) != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for g in groups:
        for i in g[1:]:
            parent[root(int(i))] = root(int(g[0]))
        if g:
            root(int(g[0]))
    merged: dict[int, list[int]] = {}
    for i in sorted(parent):
        merged.setdefault(root(i), []).append(i)
    return sorted((g for g in merged.values() if len(g) > 1), key=lambda g: g[0])
