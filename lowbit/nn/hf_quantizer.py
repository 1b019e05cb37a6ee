"""transformers integration: `AutoModelForCausalLM.from_pretrained(dir)` loads a lowbit checkpoint natively.

A checkpoint's `config.json` carries `quantization_config = {"quant_method": "lowbit", "format_version": 1,
"layers": {fqn: plan entry}}` (the manifest's per-layer plan, see `lowbit.nn.checkpoint`). Once
`register()` has run, transformers maps `quant_method: "lowbit"` to `LowbitConfig` and `LowbitHfQuantizer`
through its public registration functions (`transformers.quantizers.auto.register_quantization_config` and
`register_quantizer`). The quantizer swaps an empty `QLinear` in for every layer of the plan on the meta
device before the weights load, so the stored codes, scales, zeros, low-rank factors and smoothing vectors
load into them by name, each keeping its stored dtype; the model then runs exactly as `lowbit.load(dir)`.

Without lowbit, transformers would skip an unknown `quant_method` with one warning and load the model with
its quantized layers randomly initialised. So config.json also names `transformers_weights` (transformers'
explicit weights file) as `WEIGHTS_GUARD`, a file that does not exist and whose name says to import lowbit:
plain transformers fails on it. The registered quantizer sees the config before the weights file is
resolved (`update_attn_implementation`, the one hook that receives the model config) and removes the
guard, then runs `lowbit.load`'s checks (manifest, folder, hashes, config sizes) before the model is built
and refuses non-finite scales after the weights load; `save_pretrained`, which can write neither the manifest
nor the guard, is refused (`lowbit.save(model, folder)` writes a checkpoint again).

Importing this module costs nothing (no transformers or torch import): `register_when_imported()` registers
at once when transformers' quantizer registry is already imported, else right after it is first imported.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import logging
import sys
from pathlib import Path

QUANT_METHOD = "lowbit"
REGISTRY_MODULE = "transformers.quantizers.auto"
WEIGHTS_GUARD = "import lowbit before loading this lowbit checkpoint.safetensors"


class HfIntegrationError(ValueError):
    """A lowbit quantization config that transformers cannot load (bad plan, not pre-quantized)."""


def quantization_config(plan: dict) -> dict:
    """The `quantization_config` entry of config.json for a checkpoint with per-layer `plan`."""
    from lowbit.nn.manifest import FORMAT_VERSION

    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "layers": plan}


def add_quantization_config(config_json: str | Path, plan: dict) -> None:
    """Write `quantization_config(plan)` and the weights guard into a saved config.json (replacing any
    quantization config)."""
    path = Path(config_json)
    d = json.loads(path.read_text())
    d["quantization_config"] = quantization_config(plan)
    d["transformers_weights"] = WEIGHTS_GUARD
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def _check_plan(layers: object, format_version: object) -> None:
    from lowbit.nn.manifest import FORMAT_VERSION, ZEROS_PACKED_FROM, CheckpointError, check_layer_entry
    from lowbit.quantizers import QuantSpec

    if not isinstance(format_version, int) or not 1 <= format_version <= FORMAT_VERSION:
        raise HfIntegrationError(
            f"lowbit quantization_config format_version {format_version!r} is not supported "
            f"(this lowbit reads 1..{FORMAT_VERSION}); upgrade lowbit"
        )
    if not isinstance(layers, dict) or not layers:
        raise HfIntegrationError("lowbit quantization_config needs 'layers', the per-layer plan")
    for fqn, entry in layers.items():
        try:
            check_layer_entry(fqn, entry)
        except CheckpointError as e:
            raise HfIntegrationError(f"lowbit quantization_config: {e}") from None
        if format_version < ZEROS_PACKED_FROM and QuantSpec.from_dict(entry["spec"]).has_zeros:
            raise HfIntegrationError(
                f"this checkpoint (format_version {format_version}) stores a byte per zero point; "
                "lowbit.load(path) reads it, and lowbit.save(model, new_path) rewrites it for transformers"
            )


@functools.cache
def _classes() -> tuple[type, type]:
    """(LowbitConfig, LowbitHfQuantizer), built on first use so that importing this module stays free."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from lowbit.nn.manifest import (
        FORMAT_VERSION,
        MANIFEST,
        WEIGHTS,
        CheckpointError,
        check_finite,
        verify_checkpoint,
    )
    from lowbit.nn.qlinear import QLinear, replace_linears

    class LowbitConfig(QuantizationConfigMixin):
        """transformers' view of a lowbit checkpoint: the per-layer plan (fqn -> spec, shape, rank, ...)."""

        def __init__(self, layers: dict | None = None, format_version: int = FORMAT_VERSION, **kwargs):
            _check_plan(layers, format_version)
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.layers = layers

        def to_dict(self) -> dict:
            head = {"quant_method": QUANT_METHOD, "format_version": self.format_version}
            return {**head, "layers": self.layers}

    class LowbitHfQuantizer(HfQuantizer):
        """Loads pre-quantized lowbit checkpoints: QLinear swapped in by name before the weights load."""

        requires_calibration = True  # only pre-quantized checkpoints: compress with `lowbit compress`
        verified: Path | None = None
        weights: list[str] = []  # the safetensors files the verified manifest lists

        def update_attn_implementation(self, config):
            if getattr(config, "transformers_weights", None) == WEIGHTS_GUARD:
                del config.transformers_weights  # transformers then reads the weights
            folder = Path(config.name_or_path)
            if folder.is_dir():  # checked before the model is built: bad sizes never allocate
                self._verify(folder)
            return super().update_attn_implementation(config)

        def _verify(self, folder: Path) -> None:
            if not (folder / MANIFEST).is_file():
                raise HfIntegrationError(
                    f"{folder} has no {MANIFEST}, so its files cannot be checked; write lowbit models with "
                    "lowbit.save(model, folder), not save_pretrained"
                )
            try:
                manifest = verify_checkpoint(folder)
            except CheckpointError as e:
                raise HfIntegrationError(str(e)) from None
            if manifest["layers"] != self.quantization_config.layers:
                raise HfIntegrationError(f"quantization_config of {folder} does not match its manifest")
            self.verified = folder.resolve()
            self.weights = sorted(n for n in manifest["files"] if n.endswith(".safetensors"))

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            files = [Path(f) for f in checkpoint_files or []]
            if not files or len({f.parent for f in files}) != 1:
                raise HfIntegrationError(f"a lowbit checkpoint is {WEIGHTS} or shards beside its manifest")
            if files[0].parent.resolve() != self.verified:  # e.g. a hub snapshot folder
                self._verify(files[0].parent)
            if sorted(f.name for f in files) != self.weights:
                raise HfIntegrationError(f"the weights files of {files[0].parent} are not its manifest's")
            # model is on the meta device here; each QLinear takes the dtype of the Linear it replaces
            replace_linears(model, self.quantization_config.layers, device="meta")
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            for name, m in model.named_modules():
                if isinstance(m, QLinear):
                    try:
                        check_finite(((f"{name}.{k}", t) for k, t in m.state_dict().items()), {name})
                    except CheckpointError as e:
                        raise HfIntegrationError(str(e)) from None
            return model

        def is_serializable(self) -> bool:
            # save_pretrained can write neither the manifest nor the guard (it drops transformers_weights),
            # so its copy would load unchecked, or randomly initialised without lowbit: refused
            logging.getLogger(__name__).warning("save lowbit models with lowbit.save(model, folder)")
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    return LowbitConfig, LowbitHfQuantizer


def register() -> None:
    """Make transformers load `quant_method: "lowbit"` checkpoints; idempotent."""
    from transformers.quantizers import auto

    config_cls, quantizer_cls = _classes()
    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(config_cls)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(quantizer_cls)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs `register()` right after transformers' quantizer registry module is first imported."""

    def find_spec(self, name, path, target=None):
        if name != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


def register_when_imported() -> None:
    """Register now if transformers' quantizer registry is imported, else as soon as it is; idempotent."""
    if REGISTRY_MODULE in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
