"""Quantized weights that stay quantized in memory: one module per method, each rewriting the
model's linear layers before the weights load (see base.py for the contract).

The method is what `quantization=` names, or what the checkpoint says: config.json's
quantization_config.quant_method for HF folders, the tensor types for a GGUF file (served as
stored unless quantization="none"). A checkpoint quantized with a method not listed here fails
at load, naming the supported ones: its packed tensors would otherwise load as garbage.
"""

from __future__ import annotations

import importlib

from transformers import PretrainedConfig

from pagedllm.config import QUANTIZATION_CHOICES
from pagedllm.model.layers.quantization.base import QuantizationMethod
from pagedllm.model.source import ModelSource

# name -> "module:class"; imported on first use so a float model never loads their kernels
QUANTIZATION_METHODS = {
    "gguf": "pagedllm.model.layers.quantization.gguf:GGUFQuantization",
    "awq": "pagedllm.model.layers.quantization.awq:AWQQuantization",
    "gptq": "pagedllm.model.layers.quantization.gptq:GPTQQuantization",
    "compressed-tensors":
        "pagedllm.model.layers.quantization.compressed_tensors:CompressedTensorsQuantization",
}
# QUANTIZATION_CHOICES (config.py) is what a user may ask for: one of these methods, or "none";
# None asks for whatever the checkpoint is (tests/model/test_loader.py checks the two agree)


def method_class(name: str) -> type[QuantizationMethod]:
    module_name, class_name = QUANTIZATION_METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def checkpoint_method(hf_config: PretrainedConfig, source: ModelSource) -> str | None:
    """The method the checkpoint was quantized with, None for float weights."""
    if source.is_gguf:
        return "gguf"
    quant_config = getattr(hf_config, "quantization_config", None)
    if not quant_config:
        return None
    if not isinstance(quant_config, dict):
        quant_config = quant_config.to_dict()
    name = str(quant_config.get("quant_method", "")).lower().replace("_", "-")
    if name not in QUANTIZATION_METHODS:
        raise ValueError(f"the checkpoint is quantized with {name or 'an unnamed method'!r}, "
                         f"which pagedllm does not support; supported: "
                         f"{', '.join(QUANTIZATION_METHODS)}")
    return name


def resolve_quantization(requested: str | None, hf_config: PretrainedConfig,
                         source: ModelSource) -> QuantizationMethod | None:
    """The method the model runs with, or None for float weights."""
    if requested is not None and requested not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, "
                         f"got {requested!r}")
    stored = checkpoint_method(hf_config, source)
    if requested == "none":
        if stored not in (None, "gguf"):
            raise ValueError(f"the checkpoint is quantized with {stored!r} and cannot be "
                             f"served unquantized; use quantization={stored!r} or leave it unset")
        return None
    if requested is not None and requested != stored:
        found = f"quantized with {stored!r}" if stored else "not quantized"
        raise ValueError(f"quantization={requested!r} was asked for, but the checkpoint is "
                         f"{found}")
    if stored is None:
        return None
    return method_class(stored).from_checkpoint(hf_config, source)
