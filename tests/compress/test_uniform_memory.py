"""The uniform path frees each original layer once its QLinear is in the model, not at the end."""

import weakref

import pytest
import torch
from torch import nn

from lowbit.compress import uniform
from lowbit.compress.presets import preset
from tests.conftest import make_tiny_llama


@pytest.mark.parametrize(
    "name, expected", [("int4-g128", list(range(14, 0, -1))), ("int4-g128-gptq", [14] * 7 + [7] * 7)]
)
def test_original_layers_are_freed_as_they_are_quantized(monkeypatch, name, expected):
    model = make_tiny_llama(300)
    refs = [weakref.ref(m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    alive = []
    compress_layer = uniform.compress_layer

    def counting(*args):
        alive.append(sum(r() is not None for r in refs))
        return compress_layer(*args)

    monkeypatch.setattr(uniform, "compress_layer", counting)
    calib = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    uniform.quantize_model(model, preset(name), calib_data=calib, progress=False)
    assert alive == expected  # RTN: one fewer per layer; GPTQ: a block's originals go after the block
    assert all(r() is None for r in refs)
