"""An adapter's tensors, read from its folder and packed into the LoRA layers' slot layout
(model/layers/lora.py): per layer, A [pieces * r, in] and block-diagonal B [pieces * r, out]
with the scaling folded into B, in the model's dtype, on the CPU until a slot takes them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.lora.peft import (
    AdapterConfig,
    ModuleShapes,
    WeightName,
    check_adapter,
    check_weight_shapes,
    parse_weight_name,
)
from pagedllm.lora.request import LoRARequest
from pagedllm.model.layers.lora import LoRALinear
from pagedllm.model.llama import STACKED_PARAMS


@dataclass(slots=True)
class PackedAdapter:
    lora_int_id: int
    config: AdapterConfig
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer path -> (A, B) packed

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.layers.values())


def read_tensors(config: AdapterConfig) -> dict[str, torch.Tensor]:
    """The weights file's tensors on the CPU (a .bin through torch.load's weights_only, which
    unpickles tensors and nothing else)."""
    path = config.weights_file
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file: the caller's ValueError, not a crash
        raise ValueError(f"cannot read the LoRA weights {path!r}: {exc}") from exc
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor)
                                                for t in tensors.values()):
        raise ValueError(f"{path!r} is not a dictionary of tensors")
    return tensors


def load_adapter(request: LoRARequest, max_rank: int, layers: dict[str, LoRALinear],
                 modules: ModuleShapes, dtype: torch.dtype) -> PackedAdapter:
    """Read, check (ValueError naming the problem) and pack one adapter."""
    config = check_adapter(request.lora_path, max_rank, modules)
    tensors = read_tensors(config)
    check_weight_shapes(config, {k: tuple(t.shape) for k, t in tensors.items()}, modules)
    grouped: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        name = parse_weight_name(key, config.folder)
        path, piece = _layer_of(name, layers, config.folder)
        grouped.setdefault(path, {}).setdefault(piece, {})[name.matrix] = tensor
    packed = {path: _pack(layers[path], pieces, config, dtype)
              for path, pieces in grouped.items()}
    return PackedAdapter(request.lora_int_id, config, packed)


def _layer_of(name: WeightName, layers: dict[str, LoRALinear], folder: str) -> tuple[str, int]:
    """The LoRA layer an adapter module lives in, and its piece there."""
    parent = name.module.rpartition(".")[0]
    fused = STACKED_PARAMS.get(name.leaf, (name.leaf, 0))[0]
    for path in (f"{parent}.{name.leaf}", f"{parent}.{fused}"):
        layer = layers.get(path)
        if layer is None:
            continue
        for index, (piece, _, _) in enumerate(layer.pieces):
            if piece == name.leaf:
                return path, index
    raise ValueError(f"the LoRA adapter {folder!r} targets {name.module}, which this model "
                     f"lacks")


def _pack(layer: LoRALinear, pieces: dict[int, dict[str, torch.Tensor]], config: AdapterConfig,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    rank = config.rank
    a = torch.empty(len(pieces) * rank, layer.in_features, dtype=dtype)
    b = torch.zeros(len(pieces) * rank, layer.out_features, dtype=dtype)
    for i, index in enumerate(sorted(pieces)):
        _, first, width = layer.pieces[index]
        rows = slice(i * rank, (i + 1) * rank)
        a[rows] = pieces[index]["A"].to(dtype)
        b[rows, first:first + width] = (pieces[index]["B"].float() * config.scaling).T.to(dtype)
    return a, b
