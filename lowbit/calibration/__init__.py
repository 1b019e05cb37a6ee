"""Calibration: token blocks in, per-layer statistics out (activation magnitudes, Hessians, Fishers).

    stats = calibrate(model, tokens, stats=("act", "hessian"))
    H = stats["model.layers.0.self_attn.q_proj"].hessian_matrix()   # GPTQ's 2/n X^T X, fp32 [K, K]
    stats.save("calib.safetensors")

`calibrate_sequential` is the block-by-block runner underneath, with a per-block callback for compressing a
model block by block; `fisher_diagonal` computes squared-gradient Fisher weights over the whole model.
"""

from lowbit.calibration.sequential import (
    PROPAGATE,
    BlockInputs,
    calibrate,
    calibrate_sequential,
    capture_block_inputs,
)
from lowbit.calibration.stats import (
    STAT_KINDS,
    CalibrationError,
    CalibrationStats,
    LayerStats,
    find_blocks,
    fisher_diagonal,
    is_linear,
    select_linears,
)

__all__ = [
    "PROPAGATE",
    "STAT_KINDS",
    "BlockInputs",
    "CalibrationError",
    "CalibrationStats",
    "LayerStats",
    "calibrate",
    "calibrate_sequential",
    "capture_block_inputs",
    "find_blocks",
    "fisher_diagonal",
    "is_linear",
    "select_linears",
]
