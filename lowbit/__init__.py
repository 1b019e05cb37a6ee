"""lowbit: compress large language models into low-bit + low-rank checkpoints.

    import lowbit
    model, report = lowbit.compress("smollm2-135m", lowbit.preset("int4-g128"), out="out/int4")
    model = lowbit.load("out/int4")

The public names are imported lazily so that `import lowbit.quantizers` stays light. Importing lowbit
registers its quantizer with transformers (as soon as transformers' quantizer registry is imported),
so `AutoModelForCausalLM.from_pretrained(lowbit_checkpoint)` works.
"""

from importlib import import_module

from lowbit.compress.hf import register_when_imported

__version__ = "0.1.0"

_EXPORTS = {
    "compress": "lowbit.compress.pipeline",
    "load": "lowbit.compress.checkpoint",
    "save": "lowbit.compress.checkpoint",
    "calibrate": "lowbit.calibration",
    "decompose": "lowbit.lowrank",
    "quantize": "lowbit.quantizers",
    "dequantize": "lowbit.quantizers",
    "QuantSpec": "lowbit.quantizers",
    "Recipe": "lowbit.compress.recipe",
    "preset": "lowbit.compress.recipe",
    "load_recipe": "lowbit.compress.recipe",
}

__all__ = sorted(_EXPORTS)

register_when_imported()


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
