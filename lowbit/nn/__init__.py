"""The runtime: what loads and runs a lowbit checkpoint, importable without PuLP, datasets or gguf.

`QLinear` (the one quantized Linear module), checkpoints (`save`, `load`, `checkpoint_info`) and their
manifest, the transformers registration (`hf_quantizer`), norm folding of smoothing vectors
(`smoothing`) and atomic writes with the one overwrite policy (`atomic`).
"""

from lowbit.nn.checkpoint import checkpoint_info, load, load_tokenizer, save
from lowbit.nn.qlinear import QLinear, QLinearError

__all__ = ["QLinear", "QLinearError", "checkpoint_info", "load", "load_tokenizer", "save"]
