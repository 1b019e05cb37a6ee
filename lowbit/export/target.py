"""What an export target is: the one type every entry of `lowbit.export.TARGETS` is.

A target writes a loaded lowbit model in a format another engine reads, reloads such a folder as the
model that engine computes (for `lowbit eval` and the tests), and counts the bits its files store. A
target that holds only some weight formats says which (`problem`), what it converts the others to
(`nearest`) and how its reader decodes a layer (`decoded`); `lowbit.export.fit` then refuses or converts
the layers it cannot hold and reports each layer's weight error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.nn.qlinear import QLinear
from lowbit.quantizers import QuantSpec


class ExportError(ValueError):
    """An export that cannot be done as asked: unknown target, inexpressible layers, existing output."""


@dataclass(frozen=True)
class Target:
    """One export target.

    name: the format's name in messages ("compressed-tensors", "GGUF", "dense").
    write(model, folder, dtype, tokenizer, name, **options): write the fitted model (and its adapter) into
      `folder`; options: the target's own keyword options, named in `options`.
    detect(folder): whether a folder holds this target's output.
    reload(folder, dtype): (model, tokenizer) computing what the target's engine computes.
    stored_bits(folder, model): bits per weight of the quantized layers as the files store them, or None.
    problem(spec, in_features): why the target cannot hold Q of this spec as is, or None; None for a
      target that holds every layer as a dense weight.
    nearest(spec, in_features, dtype): the spec a layer is re-quantized to with convert=True.
    decoded(layer, dtype): the base weight dequantize(Q) as the target's reader computes it, float32 [N, K].
    check_model(config): refuse, in one line, a model the target cannot write at all.
    options: the keyword options `write` takes (GGUF: "embedding").
    """

    name: str
    write: Callable[..., None]
    detect: Callable[[Path], bool]
    reload: Callable[[Path, torch.dtype], tuple[nn.Module, object]]
    stored_bits: Callable[[Path, nn.Module], float | None]
    problem: Callable[[QuantSpec, int], str | None] | None = None
    nearest: Callable[[QuantSpec, int, torch.dtype], QuantSpec] | None = None
    decoded: Callable[[QLinear, torch.dtype], torch.Tensor] | None = None
    check_model: Callable[[object], None] | None = None
    options: tuple[str, ...] = ()
