"""lowbit: compress large language models into low-bit + low-rank checkpoints.

    import lowbit
    model, report = lowbit.compress("smollm2-135m", "int4-g128", out="out/int4")
    model = lowbit.load("out/int4")

Every public name is bound here explicitly, once: `lowbit.compress` is the function whatever was
imported before or after (the sub-package of the same name is imported first, so importing any of its
modules later never rebinds the name). Importing lowbit also registers its quantizer with transformers
(`lowbit.nn.hf_quantizer`), so `AutoModelForCausalLM.from_pretrained(lowbit_checkpoint)` works.
"""

from lowbit.calibration import calibrate
from lowbit.compress import api as _api
from lowbit.compress.presets import preset
from lowbit.compress.recipe import Recipe, load_recipe
from lowbit.export import export
from lowbit.lowrank import decompose
from lowbit.nn.checkpoint import load, save
from lowbit.nn.hf_quantizer import register_when_imported
from lowbit.quantizers import QuantSpec, dequantize, quantize

__version__ = "0.1.0"

compress = _api.compress

__all__ = [
    "QuantSpec",
    "Recipe",
    "calibrate",
    "compress",
    "decompose",
    "dequantize",
    "export",
    "load",
    "load_recipe",
    "preset",
    "quantize",
    "save",
]

register_when_imported()
