"""Copying checkpoint tensors into a model's parameters, with the checks every family needs."""

from __future__ import annotations

import re

import torch
from torch import nn

# checkpoint names of an fp8 KV cache's scales: llm-compressor's kv_cache_scheme writes
# self_attn.k_scale / v_scale, older FP8 checkpoints k_proj.output_scale / v_proj.output_scale
KV_SCALE_NAME = re.compile(r"(.*\.self_attn)\.(?:(k|v)_scale|(k|v)_proj\.output_scale)$")


def copy_checked(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> None:
    """params[name] <- tensor (this rank's part of it, under tensor parallelism: the Shard
    model/layers/linear.attach_shards put on the parameter); a name the model lacks or a wrong
    shape is a ValueError."""
    if name not in params:
        raise ValueError(f"checkpoint has an unexpected weight {name!r}")
    param = params[name]
    shard = getattr(param, "tp_shard", None)
    if shard is not None:
        tensor = shard.take(tensor)
    if param.shape != tensor.shape:
        raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, "
                         f"expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)


def load_kv_scale(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """If `name` is a layer's K or V cache scale, set it on the layer's KVScales and say so."""
    match = KV_SCALE_NAME.fullmatch(name)
    if match is None:
        return False
    attention = model.get_submodule(match.group(1))
    if tensor.numel() != 1:
        raise ValueError(f"{name} has {tensor.numel()} values; pagedllm takes one K and one V "
                         "scale per layer")
    scales = attention.kv_scales
    k_scale, v_scale = scales.k_scale, scales.v_scale
    if (match.group(2) or match.group(3)) == "k":
        k_scale = tensor.float().item()
    else:
        v_scale = tensor.float().item()
    scales.set(k_scale, v_scale)
    return True
