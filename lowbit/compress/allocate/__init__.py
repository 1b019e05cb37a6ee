"""Bit allocation: one (format, bits, group size, rank) configuration per weight matrix under a size budget.

LQ-LoRA (Guo et al. 2023, sec. 3.3, the ILP for mixed configuration) chooses every matrix's quantization
configuration by an integer linear program; here a candidate also carries the rank r of the high-precision
low-rank part L1 L2. With E[m, c] the error of matrix m decomposed by candidate c (a sum of squares:
Frobenius, output or Fisher-weighted, so errors add over matrices) and S[m, c] its exact storage in bits:

    minimise  sum_{m,c} E[m, c] x[m, c]
    s.t.      sum_c x[m, c] = 1 for every m,   sum_{m,c} S[m, c] x[m, c] <= B,   x[m, c] in {0, 1}

solved exactly by PuLP's bundled CBC, with B = round(budget_bpw * number of quantized weights).
`allocate_greedy` (Lagrangian relaxation plus a greedy fill) is the baseline the ILP is measured against.

    table = error_table(weights, candidate_grid(), method="lqlora")   # the expensive part; cache it
    table.save(out / "error_table.safetensors")
    alloc = table.allocate(3.0)                                        # 3 bits per weight on average
    plan = table.plan(alloc)                                           # {layer name: Candidate}

Where things are: `candidates` (Candidate, candidate_grid, candidate_bits, budget_bits), `table`
(error_row, ErrorTable, error_table), `constraints` (constraint_mask, engine_constraints, type_groups,
merge_groups), `solve` (allocate: the ILP; allocate_greedy: the greedy baseline; Allocation).
"""

from lowbit.compress.allocate.candidates import (
    PREDICATE_KEYS,
    AllocationError,
    Candidate,
    budget_bits,
    candidate_bits,
    candidate_grid,
)
from lowbit.compress.allocate.constraints import (
    TIES,
    constraint_mask,
    engine_constraints,
    layer_type,
    merge_groups,
    type_groups,
)
from lowbit.compress.allocate.solve import SOLVERS, Allocation, allocate, allocate_greedy
from lowbit.compress.allocate.table import METRICS, ErrorTable, error_row, error_table

__all__ = [
    "METRICS",
    "PREDICATE_KEYS",
    "SOLVERS",
    "TIES",
    "Allocation",
    "AllocationError",
    "Candidate",
    "ErrorTable",
    "allocate",
    "allocate_greedy",
    "budget_bits",
    "candidate_bits",
    "candidate_grid",
    "constraint_mask",
    "engine_constraints",
    "error_row",
    "error_table",
    "layer_type",
    "merge_groups",
    "type_groups",
]
