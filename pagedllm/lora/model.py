"""Rewrite a loaded model's projections as LoRA layers (model/layers/lora.py), the way a
quantization method rewrites its linear layers: the families stay unaware of adapters.

Every qkv_proj, o_proj, gate_up_proj and down_proj becomes a LoRALinear around itself. A fused
projection offers its checkpoint pieces (q_proj, k_proj, v_proj / gate_proj, up_proj, named as
in model/llama.py's STACKED_PARAMS) and its own name, for a checkpoint that stores it fused
(Phi-3); an unfused one offers its own name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagedllm.lora.peft import ModuleShapes
from pagedllm.model.layers.lora import LoRAContext, LoRALinear
from pagedllm.model.llama import STACKED_PARAMS, LlamaForCausalLM

TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(slots=True)
class LoRAModel:
    """What rewriting a model produced: its LoRA layers by module path, the context they read
    the step's slots from, and the (in, out) features of each adapter module name."""

    layers: dict[str, LoRALinear]
    context: LoRAContext
    modules: ModuleShapes


def layer_pieces(name: str, layer: nn.Module) -> list[tuple[str, int, int]]:
    """(adapter module name, first output column, width) of each piece of `layer`."""
    sizes = list(getattr(layer, "output_sizes", None) or [layer.out_features])
    pieces = sorted((shard, piece) for piece, (fused, shard) in STACKED_PARAMS.items()
                    if fused == name)
    whole = [(name, 0, layer.out_features)]
    if len(sizes) < 2 or len(pieces) != len(sizes):
        return whole
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(piece, offsets[shard], sizes[shard]) for shard, piece in pieces] + whole


def wrap_model(model: nn.Module, max_loras: int, max_rank: int, dtype: torch.dtype,
               device: torch.device | str) -> LoRAModel:
    """Replace every target projection by a LoRALinear around it, in place. Only the families
    on the Llama decoder: GPT-2 and OPT name their modules in ways peft adapters of them do
    not share with ours."""
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"enable_lora: LoRA runs on the Llama-decoder families (Llama, "
                         f"Mistral, Qwen2/3, Phi-3, Gemma 1/2/3), not {type(model).__name__}")
    context = LoRAContext()
    layers: dict[str, LoRALinear] = {}
    modules: ModuleShapes = {}
    for path, layer in list(model.named_modules()):
        name = path.rpartition(".")[2]
        if name not in TARGETS or isinstance(layer, LoRALinear):
            continue
        if not hasattr(layer, "in_features") or not hasattr(layer, "out_features"):
            raise ValueError(f"LoRA cannot wrap {path} ({type(layer).__name__}): it does not "
                             f"say its in and out features")
        pieces = layer_pieces(name, layer)
        wrapped = LoRALinear(layer, pieces, max_loras, max_rank, context, dtype, device)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapped)
        layers[path] = wrapped
        for piece, _, width in pieces:
            modules.setdefault(piece, (layer.in_features, width))
    if not layers:
        raise ValueError(f"enable_lora: {type(model).__name__} has none of the projections "
                         f"LoRA adapters target ({', '.join(TARGETS)})")
    return LoRAModel(layers, context, modules)
