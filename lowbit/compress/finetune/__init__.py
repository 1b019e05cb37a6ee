"""Quantization-aware fine-tuning of a compressed model: a short run recovers what quantization lost.

    report = finetune(model, teacher, config=FinetuneConfig(mode="l4q", steps=200), blocks=calib_blocks)

`model` holds QLinear layers (any mix of formats and ranks); what trains depends on the mode, everything
else is frozen:

- lora (QLoRA, Dettmers et al. 2023; LQ-LoRA, Guo et al. 2024): the existing low-rank factors L1, L2.
  Q stays packed and is dequantized on the fly by the qlinear kernel, whose backward gives the factors'
  gradients. Layers of rank 0 get new factors of `adapter_rank` (L1 = 0, so training starts from the
  compressed model; they add to the stored bits) or, with `adapter_rank` 0, train nothing; a model
  without low-rank factors and without `adapter_rank` is refused.
- peqa (PEQA, Kim et al. 2023): the per-group scales; codes and zero points stay bit-identical.
- l4q (L4Q, Jeon et al. 2024): LoRA factors B A (rank `config.rank`, B = 0 at the start) on the frozen
  latent W0 and LSQ step sizes, trained jointly through the quantizer; B A is then merged into the codes,
  so every layer ends as a purely quantized layer of rank 0 with the learned scales.
- lsq (LSQ, Esser et al. 2020): step sizes (and zero points of asymmetric INT) together with the low-rank
  factors; the codes are re-encoded with the learned scales, the low-rank part is kept.

The latent W0 of l4q and lsq is the teacher's dense weight of the same layer when a teacher is given
(times the smoothing vector), else it is rebuilt from the layer as dequantize(Q) + L1 L2. With `latent`
"compressed" (the default) it is clipped into the rounding cells of the stored codes, so training starts
from the compressed model exactly (GPTQ's codes included); "original" restarts the codes from
round-to-nearest of W0, as L4Q does (see `FakeQuantLinear`). After training every QLinear holds a valid
packed QTensor again and its `layer_plan()` tells its rank; `FinetuneReport.plan` is the new per-layer plan.

Objectives: `lm`, next-token cross-entropy on the blocks; `distill`, KL(teacher || student) of the
next-token distributions at temperature 1, plus `hidden_weight` times the mean over blocks of the MSE
between hidden states. Without training data (`data` None) the default is `distill` on the given blocks
(the calibration blocks); `data="teacher"` samples the training text from the teacher itself, and in a
compress recipe `data="calibration"` reads the job's calibration text at the section's samples and seq_len.

The last `eval_blocks` blocks are held out: evaluated every `eval_every` steps; with `patience` > 0 the
run stops after that many evaluations without improvement and the best tensors are restored. AdamW on
the trained tensors only (fp32), warmup then cosine or constant learning rate, gradient clipping,
activation checkpointing where the model supports it. With a `state_dir`, the trained tensors, AdamW's
moments, the step and the RNG state are written every `save_every` steps (safetensors + JSON) and a new
call with the same arguments resumes from them and ends with the same tensors as an uninterrupted run.
"""

from lowbit.compress.finetune.config import (
    MODES,
    OBJECTIVES,
    SCHEDULES,
    FinetuneConfig,
    FinetuneError,
    FinetuneReport,
)
from lowbit.compress.finetune.layers import export_layers, prepare_layers, trainable_tensors
from lowbit.compress.finetune.objectives import batch_indices, objective_loss, sample_blocks, training_blocks
from lowbit.compress.finetune.state import TrainState, load_state, save_state
from lowbit.compress.finetune.train import finetune, lr_factor

__all__ = [
    "MODES",
    "OBJECTIVES",
    "SCHEDULES",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneReport",
    "TrainState",
    "batch_indices",
    "export_layers",
    "finetune",
    "load_state",
    "lr_factor",
    "objective_loss",
    "prepare_layers",
    "sample_blocks",
    "save_state",
    "trainable_tensors",
    "training_blocks",
]
