"""The budget path's two passes over the decoder blocks, each with one block's statistics in memory.

Pass 1 (`table_pass`): for each block, its linears' input statistics (one Hessian per distinct input,
`calibrate_sequential`), AWQ's scales when the recipe scales (searched on that block, folded, saved
per block and replayed when the block is read again), then the block's rows of the error table (one
saved file per layer); the block's statistics are then dropped, so only numbers stay until the ILP. A
recipe whose table or decomposition needs the Fisher diagonal runs the block-wise backward pass instead
(`lowbit.calibration.backward`): the same statistics and rows, blocks in reverse order.

Pass 2 (`apply_pass`): after the ILP, the blocks again in order; each block's statistics are computed
again and its layers built with their allocated candidate (GPTQ etc.), each layer saved in the work area
as it is built. With `allocate.propagate` "quantized" (the default) each plan (one per budget, and the
check's uniform plan) is a pass of its own in which the blocks already built run quantized, so a layer's
statistics hold the errors of the layers before it (GPTQ's sequential protocol, the uniform path's; on
the built-in model uniform GPTQ nf4-g64 reads 0.8% lower out of domain and 2.1% in domain than on the
float inputs: docs/benchmarks.md, "QuaRot's sign order, and quantized inputs for the allocated
layers"). With "original" one pass builds every plan from the float model's inputs (as in pass 1).
Recomputing was chosen over keeping the statistics on disk, for the disk bound. Measured on one block of the
0.5B shape (`scripts/bench_scale.py`; `scripts/bench_budget_stats.py`, 16 x 512 tokens, one thread,
docs/benchmarks.md "Big models"): the statistics take 85 s to recompute against 2.4 s to write and read
back, about as long as the block's GPTQ (100 s), so recomputing costs time; but the Hessians are 104 MB per
block, 2.5 GB over the 24 blocks, 2.5x the bf16 model (computed for the 1.5B shape: 3.2x), where the work
area of the uniform GPTQ path holds about 2x its output. Only the Fisher of a method that reads it (lqlora-
fisher) is kept on disk from pass 1, its only source.

Several processes: each calibrates on its share of the samples (statistics all-reduced); the table's
rows are measured in units of one layer and one spec, each allocated layer is built whole, each unit
or layer by one owner rank (`owners`, balanced by `lowbit.compress.ranks.layer_cost`) and broadcast;
rank 0 writes. On the float inputs the second pass builds as many blocks at once as there are processes
(`blocks_at_once`); with quantized inputs a block's layers must be built before the next block's
statistics, so the processes share one block at a time.
"""

from __future__ import annotations

import contextlib
import shutil

import numpy as np
import torch
from torch import nn

from lowbit.calibration import calibrate_sequential
from lowbit.calibration.backward import calibrate_backward
from lowbit.calibration.stats import find_blocks, hessians_in_turn
from lowbit.compress.allocate import ErrorTable, candidate_grid, error_row
from lowbit.compress.awq import activation_scaling, apply_scales
from lowbit.compress.blocks import InMemory
from lowbit.compress.memory import release_freed_memory
from lowbit.compress.plan import allocated_choice, allocation_method, apply_choice
from lowbit.compress.ranks import layer_cost, layer_owners, shared
from lowbit.compress.recipe import Recipe
from lowbit.compress.smoothing import fold_group, norm_groups
from lowbit.compress.workarea import WorkArea
from lowbit.lowrank import METHODS, Stats, uses_gptq
from lowbit.lowrank.svdquant import shared_smoothing
from lowbit.nn.qlinear import QLinear, set_submodule
from lowbit.parallel import barrier, broadcast_tensors, owners, share, world
from lowbit.quantizers import SCALE_DTYPES


def needs_fisher(recipe: Recipe) -> bool:
    """Whether the table (metric fisher) or the decomposition reads the Fisher diagonal."""
    return recipe.allocate.metric == "fisher" or "fisher" in METHODS[allocation_method(recipe)].needs


class ScaledBlocks:
    """A block provider that replays each block's saved AWQ scales when the block is read (and, for a
    model in memory, once: its blocks keep them). `applied` holds the blocks whose scales are in."""

    def __init__(self, provider, readers: dict, linears: dict, work: WorkArea):
        self.provider, self.model, self.readers, self.linears = provider, provider.model, readers, linears
        self.work = work
        self.prefix, self.blocks = find_blocks(self.model)
        self.applied: set[int] = set()

    def scales_name(self, index: int) -> str:
        return f"scaling/block-{index:05d}.safetensors"

    def materialise(self, index: int | None) -> None:
        self.provider.materialise(index)
        if index is None or index in self.applied:
            return
        saved = self.work.load(self.scales_name(index))
        if saved is not None:
            apply_scales(self.model, self.readers, self.linears, saved[0])
            self.applied.add(index)

    def release(self, index: int | None) -> None:
        self.provider.release(index)
        if not isinstance(self.provider, InMemory):  # read again from the source: without its scales
            self.applied.discard(index)

    def on_demand(self):
        return self.provider.on_demand()


def _block_names(names, prefix: str, index: int) -> list[str]:
    return [n for n in names if n.startswith(f"{prefix}.{index}.")]


def _spec_parts(grid) -> list[list[int]]:
    """The grid's candidate indices grouped by quantization spec, in grid order: `error_row` measures each
    spec on its own (one quantization, one SVD for all its ranks), so these are the table's units of work."""
    parts: dict = {}
    for i, c in enumerate(grid):
        parts.setdefault(c.spec, []).append(i)
    return list(parts.values())


def _unit_owners(linears: dict, names: list[str], parts: list[list[int]], size: int) -> dict:
    """{(name, p): rank}: the owner of each unit of the table's work (layer `name`, spec part p), balanced
    over `size` processes by `layer_cost`."""
    units = [(n, p) for n in names for p in range(len(parts))]
    return owners({u: layer_cost(linears[u[0]].weight.shape) for u in units}, size)


def _owned_rows(names: list[str], parts: list[list[int]], own: dict[str, int], compute, save) -> dict:
    """{name: ({"errors", "sizes"}, {})}: the table rows of `names`, split into one unit per layer and
    spec (`_spec_parts`), each unit computed by compute(name, indices) -> (errors, sizes) of those
    candidates on its owner rank (`_unit_owners`), broadcast to every rank in order and put in place;
    a row so assembled equals the row `error_row` measures whole, bit for bit. Rank 0 passes each row
    to save(name, row). Several units per layer keep the processes busy where one layer's row costs
    more than all the others of its block (the 0.5B shape's down_proj)."""
    w = world()
    mine = {(n, p): compute(n, parts[p]) for (n, p), rank in own.items() if rank == w.rank}
    size = sum(len(part) for part in parts)
    out = {}
    for n in names:
        errors, sizes = torch.empty(size, dtype=torch.float64), torch.empty(size, dtype=torch.int64)
        for p, part in enumerate(parts):
            sent = mine.pop((n, p), None)
            sent = (None, None) if sent is None else ({"errors": sent[0], "sizes": sent[1]}, {})
            got = broadcast_tensors(*sent, own[n, p], w)[0]
            errors[part], sizes[part] = got["errors"], got["sizes"]
        out[n] = {"errors": errors, "sizes": sizes}, {}
        if w.main:
            save(n, out[n])
    return out


def table_pass(model, provider, linears, recipe: Recipe, calib_data, work: WorkArea, progress, readers):
    """Pass 1 (module docstring): the error table of `linears` (saved rows reused), with AWQ's scales
    searched and folded per block when the recipe scales; returns the ErrorTable."""
    a = recipe.allocate
    grid = candidate_grid(a.formats, a.bits, a.group_sizes, a.ranks, base=recipe.quantize.spec())
    info = dict(
        method=allocation_method(recipe),
        metric=a.metric,
        rounding=a.rounding or recipe.quantize.rounding,
        iterations=recipe.decompose.iterations,
    )
    lowrank_bits = 8 * SCALE_DTYPES[recipe.decompose.lowrank_dtype].itemsize
    keep_fisher = "fisher" in METHODS[info["method"]].needs  # pass 2 reads it again
    rows: dict[str, tuple[dict, dict]] = {}

    parts = _spec_parts(grid)

    def part(name: str, st, hessian, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        stats = None
        if st is not None:
            stats = Stats(H=hessian(name), act_max=st.act_max, fisher=st.fisher)
        W = linears[name].weight.detach().float()
        e, z = error_row(W, [grid[i] for i in indices], stats=stats, lowrank_dtype_bits=lowrank_bits, **info)
        return torch.from_numpy(e), torch.from_numpy(z)

    def save_row(name: str, result) -> None:
        work.save(f"table/{name}.safetensors", *result)

    def measure(names: list[str], block_stats: dict) -> None:
        """The rows of `names` not saved yet, measured; the saved ones read back."""
        for n in names:
            saved = work.load(f"table/{n}.safetensors")
            if saved is not None:
                rows[n] = saved
        unmeasured = [n for n in names if n not in rows]
        rank, own = world().rank, _unit_owners(linears, unmeasured, parts, world().size)
        order = [n for (n, _), r in own.items() if r == rank]  # the units this process measures, in turn
        hessian = hessians_in_turn(block_stats, [n for n in order if n in block_stats])  # freed in turn
        compute = lambda n, indices: part(n, block_stats.get(n), hessian, indices)  # noqa: E731
        rows.update(_owned_rows(unmeasured, parts, own, compute, save_row))

    def block_rows(index: int, block: nn.Module, block_stats: dict) -> None:
        names = _block_names(linears, provider.prefix, index)
        measure(names, block_stats)
        if keep_fisher and world().main:
            for n in names:
                if work.load(f"fisher/{n}.safetensors") is None:
                    work.save(f"fisher/{n}.safetensors", {"fisher": block_stats[n].fisher}, {})
        release_freed_memory()  # the block's Hessians and Fisher, freed in turn

    missing = [n for n in linears if work.load(f"table/{n}.safetensors") is None]
    if missing and recipe.needs_calibration():
        _calibrated_rows(model, provider, linears, recipe, calib_data, work, progress, readers, block_rows)
    elif missing:  # no statistics: the blocks' weights only
        for i in range(len(provider.blocks)):
            provider.materialise(i)
            block_rows(i, provider.blocks[i], {})
            provider.release(i)
    rest = [n for n in linears if n not in rows]  # saved rows, and layers outside the blocks
    if rest:
        provider.materialise(None)
        measure(rest, {})
        provider.release(None)
    names = list(linears)
    shapes = [tuple(linears[n].weight.shape) for n in names]
    errs = np.stack([rows[n][0]["errors"].numpy() for n in names])
    sizes = np.stack([rows[n][0]["sizes"].numpy() for n in names])
    return ErrorTable(names, shapes, grid, errs, sizes, info)


def _calibrated_rows(model, provider, linears, recipe, calib_data, work, progress, readers, block_rows):
    """The calibrating part of `table_pass`: each block's statistics (with the Fisher diagonal by the
    block-wise backward pass when the recipe reads it; with AWQ's scales searched and folded first when
    it scales) handed to block_rows(index, block, block_stats)."""
    prefix = provider.prefix
    names = [n for n in linears if n.startswith(prefix + ".")]
    first = share(calib_data.shape[0], world()).start  # this process's first sample
    with activation_scaling(model, readers, linears, recipe, None, 0, first) as stage:

        def scale(index: int, block: nn.Module, block_stats: dict) -> None:
            """AWQ on a block read without saved scales; the recorder moved on past a replayed one."""
            if index in provider.applied:
                stage.recorder.detach()
                if index + 1 < len(provider.blocks):
                    stage.recorder.attach(provider.blocks[index + 1])
                return
            stage(index, block, block_stats)
            provider.applied.add(index)

        def save_scales(index: int) -> None:
            """The block's scales, saved once its rows are (a resumed job replays them)."""
            ours = f"{prefix}.{index}."
            mine = {k: v.float().contiguous() for k, v in stage.scales.items() if ours in k}
            if world().main and work.load(provider.scales_name(index)) is None:
                work.save(provider.scales_name(index), mine, {})

        def forward_scale(index: int, block: nn.Module, block_stats: dict) -> None:
            scale(index, block, block_stats)
            save_scales(index)

        def both(index: int, block: nn.Module, block_stats: dict) -> None:
            if stage is not None:
                scale(index, block, block_stats)
            block_rows(index, block, block_stats)
            if stage is not None:
                save_scales(index)

        run = dict(layers=names, progress=progress, provider=provider)
        offload = dict(offload_bytes=recipe.calibration.max_hidden_memory, offload_dir=work.dir)
        if needs_fisher(recipe):
            fisher_dir = work.path("fisher-pass")
            before = forward_scale if stage is not None else None
            calibrate_backward(model, calib_data, fisher_dir, on_block=block_rows, before_block=before, **run)
            barrier(world())  # every process is done with its saved hidden states and gradients
            if world().main:
                shutil.rmtree(fisher_dir, ignore_errors=True)
        else:
            calibrate_sequential(
                model,
                calib_data,
                on_block=both,
                propagate="original" if stage is None else "quantized",
                keep=False,
                **run,
                **offload,
            )


def apply_pass(
    model,
    provider,
    linears,
    recipe: Recipe,
    plans: dict,
    calib_data,
    work: WorkArea,
    progress,
    readers,
    done=None,
):
    """Pass 2 (module docstring): every layer of `linears` built with its candidate in each plan
    ({tag: {name: Candidate}}), saved as `<tag>/<name>.safetensors` (layers already saved are reused).
    SVDQuant's shared smoothing: each norm's lambda saved as `<tag>/smoothing/<norm>.safetensors`.
    With `propagates_quantized(recipe)` each plan is a pass of its own, whose blocks run with the plan's
    layers once they are built (GPTQ's protocol); otherwise one pass on the float model's inputs builds
    every plan.

    done(index, {tag: {name: QLinear}}): called with each block's layers while the block is in memory.
    """
    prefix = provider.prefix
    method = METHODS[allocation_method(recipe)]
    fisher = "fisher" in method.needs
    quantized = propagates_quantized(recipe)

    def pending(tag: str, names) -> list[str]:
        return [n for n in names if work.load(f"{tag}/{n}.safetensors") is None]

    rank = world()

    def build_window(
        window: list[tuple[int | None, dict]], own: dict[str, int], current, these, done
    ) -> None:
        """The layers of the blocks in `window` ([(index, statistics this rank keeps)]) for the plans
        `these`, built, each by its owner own[name], then shared block by block and handed to done(index,
        ...) in turn. Every block but `current` (materialised by the caller) is read again for its turn
        and released after."""

        @contextlib.contextmanager
        def visit(index):
            if index != current:
                provider.materialise(index)
            yield
            if index != current:
                provider.release(index)

        mine = {tag: {} for tag in these}
        for index, block_stats in window:
            with visit(index):
                names = _block_names(linears, prefix, index) if index is not None else outside
                if method.shares_smoothing:  # the smoothing search of each plan reads the sums again
                    hessian = _normalised_copy(block_stats)
                else:  # each Hessian normalised in place, freed once the last plan's last reader has it
                    order = [n for _ in these for n in names if n in block_stats]
                    hessian = hessians_in_turn(block_stats, order)
                for tag, plan in these.items():
                    smooth = {}
                    if method.shares_smoothing:
                        smooth = _smoothing(model, readers, linears, names, plan, block_stats, work, tag)
                    new = set(pending(tag, names))
                    for name in names:
                        if own[name] != rank.rank:
                            continue
                        q = build(name, tag, plan, block_stats, hessian, smooth)
                        if name in new and rank.main:
                            work.save(f"{tag}/{name}.safetensors", q.state_dict(), q.layer_plan())
                        mine[tag][name] = q
        for index, _ in window:
            with visit(index):
                names = _block_names(linears, prefix, index) if index is not None else outside
                built = {}
                for tag in these:
                    # the layers the other ranks built (one process saved all of its own above)
                    new = set(pending(tag, names)) if rank.main and rank.size > 1 else set()
                    built[tag] = {}
                    for name, q in shared(model, names, own, mine[tag], rank):
                        if name in new:
                            work.save(f"{tag}/{name}.safetensors", q.state_dict(), q.layer_plan())
                        built[tag][name] = q
                if done is not None:
                    done(index, built)
        release_freed_memory()

    def build(name: str, tag: str, plan: dict, block_stats: dict, hessian, smooth: dict) -> QLinear:
        lin, saved = linears[name], work.load(f"{tag}/{name}.safetensors")
        if saved is not None:
            q = QLinear.from_plan(saved[1], lin.weight.dtype, device=lin.weight.device)
            q.load_state_dict(saved[0], assign=True)
            return q
        st = block_stats.get(name)
        F = work.load(f"fisher/{name}.safetensors")[0]["fisher"] if fisher else None
        H = None if st is None else hessian(name)
        stats = Stats(H=H, act_max=None if st is None else st.act_max, fisher=F)
        return apply_choice(lin, allocated_choice(plan[name], recipe), recipe, stats, smooth.get(name))

    n_blocks = len(provider.blocks)
    size = 1 if quantized else blocks_at_once(rank)
    outside = [n for n in linears if not n.startswith(prefix + ".")]
    window: list[tuple[int, dict]] = []  # blocks whose layers are still to build, with the kept statistics
    owned: dict[str, int] = {}

    def add_block(index: int, block_stats: dict, these: dict, done) -> None:
        """Block `index` (materialised) into its window, keeping only the statistics of the layers this
        rank owns; the window built for the plans `these` once its last block is in."""
        start = index - index % size
        if index == start:  # owners balanced over the whole window
            blocks = range(start, min(start + size, n_blocks))
            names = [n for i in blocks for n in _block_names(linears, prefix, i)]
            owned.clear()
            owned.update(layer_owners(model, names, rank))
        if not method.shares_smoothing:  # the smoothing search reads every reader's statistics
            block_stats = {n: st for n, st in block_stats.items() if owned.get(n) == rank.rank}
        window.append((index, block_stats))
        if index == min(start + size, n_blocks) - 1:
            build_window(window, owned, index, these, done)
            window.clear()

    def swap_in(index: int, built: dict) -> None:
        """The block's layers of its one plan put in its place, so that the block runs quantized."""
        for q in built.values():
            for name, layer in q.items():
                set_submodule(model, name, layer)

    def swap_out(index: int, states) -> None:
        """The block's float layers back, before the block is released or the next plan reads it."""
        for name in _block_names(linears, prefix, index):
            set_submodule(model, name, linears[name])

    def calibrated_pass(these: dict, layers: list[str], propagate: str, done) -> None:
        calibrate_sequential(
            model,
            calib_data,
            layers=layers,
            on_block=lambda index, block, block_stats: add_block(index, block_stats, these, done),
            propagate=propagate,
            keep=False,
            progress=progress,
            provider=provider,
            after_block=swap_out if propagate == "quantized" else None,
            offload_bytes=recipe.calibration.max_hidden_memory,
            offload_dir=work.dir,
        )

    names = [n for n in linears if n.startswith(prefix + ".")]
    missing = {n for tag in plans for n in pending(tag, names)}
    calibrates = _second_pass_calibrates(recipe) and missing
    if calibrates and quantized:
        for tag, plan in plans.items():
            if pending(tag, names):
                calibrated_pass({tag: plan}, pending(tag, names), "quantized", swap_in)
    elif calibrates:
        calibrated_pass(plans, [n for n in names if n in missing], "original", done)
    if not calibrates or (quantized and done is not None):  # the saved layers, block by block
        for i in range(len(provider.blocks)):
            provider.materialise(i)
            add_block(i, {}, plans, done)
            provider.release(i)
    provider.materialise(None)  # layers outside the blocks (an lm_head the recipe selects), if any
    build_window([(None, {})], layer_owners(model, outside, rank), None, plans, done)
    provider.release(None)


def propagates_quantized(recipe: Recipe) -> bool:
    """Whether the second pass runs each plan on its own, the blocks it has built quantized as the later
    blocks' statistics are collected (`allocate.propagate` "quantized", GPTQ's sequential protocol), or
    builds every plan in one pass on the float model's inputs ("original"; windows of `blocks_at_once`
    blocks over several processes). SVDQuant's shared smoothing folds into norms and is always built on
    the float inputs."""
    return (
        recipe.allocate.propagate == "quantized" and not METHODS[allocation_method(recipe)].shares_smoothing
    )


def blocks_at_once(w) -> int:
    """How many blocks the second pass builds together: one per process. Each layer is built whole by
    one owner, and a block's down_proj can be most of the block's work (GPTQ's inverse Cholesky factor of
    the [K, K] Hessian of the intermediate size K: 134 s of 218 over the 0.5B shape's 24 blocks, measured,
    docs/benchmarks.md "Big models"); one block at a time, its owner sets the pace while the others wait.
    Over as many blocks as processes the owners balance (about one down_proj each). Each process keeps
    the statistics of its own layers only until the window is built, about one block's worth, and reads
    the earlier blocks of the window again when their turn comes. One process: one block at a time."""
    return w.size


def _normalised_copy(block_stats: dict):
    """name -> a new normalised copy of the layer's Hessian (None without one): the sums stay as they are."""

    def hessian(name: str):
        st = block_stats[name]
        return None if st.hessian is None else st.hessian_matrix()

    return hessian


def _second_pass_calibrates(recipe: Recipe) -> bool:
    """Whether the allocated layers read input statistics: GPTQ rounding, or a method that does."""
    roundings = {recipe.quantize.rounding} | {o.quantize.rounding for o in recipe.overrides}
    needs = set(METHODS[allocation_method(recipe)].needs) - {"fisher"}  # the Fisher is read from disk
    return any(uses_gptq(r) for r in roundings) or bool(needs)


def _smoothing(model, readers, linears, names, plan, block_stats, work: WorkArea, tag: str) -> dict:
    """{layer: (lambda, folded)} of SVDQuant's shared smoothing for the block's layers that read a norm:
    one lambda per norm (saved under `tag`), searched with each reader's allocated spec and rank; the
    fold is tried (to know whether the layers keep their lambda) and undone."""
    smooth = {}
    for norm, members in norm_groups(model, readers, names).items():
        saved = work.load(f"{tag}/smoothing/{norm}.safetensors")
        if saved is None:
            st = block_stats.get(members[0])
            stats = Stats() if st is None else Stats(H=st.hessian_matrix(), act_max=st.act_max)
            Ws = [linears[n].weight.detach().float() for n in members]
            specs, ranks = [plan[n].spec for n in members], [plan[n].rank for n in members]
            lam, _ = shared_smoothing(Ws, specs, ranks, stats)
            saved = ({} if lam is None else {"lambda": lam}), {}
            if world().main:
                work.save(f"{tag}/smoothing/{norm}.safetensors", *saved)
        lam = saved[0].get("lambda")
        if lam is None:
            continue
        touched = [norm, *readers[norm][0]]
        before = [
            (m, {k: v.clone() for k, v in m.state_dict().items()}) for m in map(model.get_submodule, touched)
        ]
        folded = fold_group(model, norm, readers, members, lam)
        for m, state in before:
            m.load_state_dict(state)
        smooth.update({n: (lam, folded) for n in members})
    return smooth
