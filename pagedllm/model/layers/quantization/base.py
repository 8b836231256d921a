"""The contract every quantization method keeps: rewrite a model's linear layers before its
weights load, so the checkpoint's packed tensors fill the method's own parameters.

    method = QuantizationMethod subclass, built from the checkpoint (from_checkpoint)
    with torch.device("meta"):
        model = ModelClass(...)              plain Linear / MergedLinear layers
        method.quantize_model(model, dtype)  each Linear the method covers -> its layer
    model.to_empty(device)                   the packed tensors get memory, in their own dtypes
    model.load_weights(checkpoint)           names as in the checkpoint: q_proj.qweight, ...
    prepare_for_inference(model)             each layer may repack for its kernel

A quantized layer keeps the Linear interface the families rely on: `forward(x)`, the fused
projections' `output_sizes` and `load_shard(param_name, shard, tensor)`, and
`prepare_for_inference()`. Its tensors are registered as parameters (requires_grad=False) under
the checkpoint's names, so `load_weights` fills and checks them like any other weight.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedllm.model.layers.linear import Linear
from pagedllm.model.source import ModelSource


class QuantizationMethod(ABC):
    name: ClassVar[str]  # what quantization= / --quantization calls it

    @classmethod
    @abstractmethod
    def from_checkpoint(cls, hf_config: PretrainedConfig,
                        source: ModelSource) -> QuantizationMethod:
        """The method's settings as the checkpoint states them (config.json's
        quantization_config, or the GGUF file's tensor types); a setting it cannot run is a
        ValueError naming it."""

    @abstractmethod
    def quantized_layer(self, prefix: str, layer: Linear,
                        dtype: torch.dtype) -> nn.Module | None:
        """The layer that replaces `layer` (module path `prefix`), or None to keep it float
        (a layer the checkpoint left unquantized, such as lm_head). `dtype` is the activation
        type."""

    def quantize_model(self, model: nn.Module, dtype: torch.dtype) -> None:
        """Replace every Linear this method covers, in place (call on the meta model)."""
        for prefix, layer in list(model.named_modules()):
            if not isinstance(layer, Linear):
                continue
            replacement = self.quantized_layer(prefix, layer, dtype)
            if replacement is not None:
                parent_name, _, child = prefix.rpartition(".")
                setattr(model.get_submodule(parent_name), child, replacement)

    def describe(self) -> str:
        """One line for the start-up log."""
        return self.name


def frozen(tensor: torch.Tensor) -> nn.Parameter:
    """A packed tensor as a parameter load_weights can find (never trained)."""
    return nn.Parameter(tensor, requires_grad=False)
