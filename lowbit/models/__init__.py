"""Source models: what `lowbit compress` reads (built-in names, local folders, GGUF files, hub ids).

model, tokenizer = load_model("smollm2-135m")     # a dense transformers model in eval mode
"""

from lowbit.models.builtin import BUILTIN_MODELS, builtin_path
from lowbit.models.errors import ModelError
from lowbit.models.source import check_model, load_model

__all__ = ["BUILTIN_MODELS", "ModelError", "builtin_path", "check_model", "load_model"]
