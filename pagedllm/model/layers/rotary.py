"""Rotary position embeddings, with every rope_scaling variant transformers knows.

The inverse frequencies come from transformers' own rope functions (linear, dynamic, yarn,
longrope, llama3, ...), so a config means exactly what it means there; cos/sin are then cached
for every position up to max_model_len and looked up by position ids.

LongRoPE (Phi-3) has two sets of frequencies: "short" while a sequence is at most
original_max_position_embeddings long, "long" beyond. As in transformers, the choice is made per
forward pass of a sequence, from its length after that pass: the table holds both sets,

    rows [0, max_model_len): short      rows [max_model_len, 2 * max_model_len): long

and `table_rows` shifts the positions of the sequences past the original length into the second
half. Keys already cached keep the rotation they were written with, as in transformers' cache.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.ops.cpu import kernels_for


def rope_parameters(config: PretrainedConfig, layer_type: str | None = None) -> dict:
    """The rope settings of one layer type. Models whose layer types rotate differently (Gemma 3:
    a local base for "sliding_attention", scaling on "full_attention") keep one dict per type in
    transformers 5's rope_parameters; everyone else has a single flat dict."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params[layer_type]
    if "rope_theta" not in params:  # older configs keep theta beside rope_scaling
        params = {**(getattr(config, "rope_scaling", None) or {}),
                  "rope_theta": getattr(config, "rope_theta", 10000.0)}
    return params


def partial_rotary_factor(config: PretrainedConfig, layer_type: str | None = None) -> float:
    """Share of each head that is rotated; transformers 5 keeps it in rope_parameters
    (Phi-3/Phi-4-mini), older configs as a top-level attribute."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params[layer_type]
    return params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))


def inverse_frequencies(config: PretrainedConfig, rotary_dim: int, max_model_len: int,
                        layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    params = rope_parameters(config, layer_type)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope type {rope_type!r}; known: {sorted(ROPE_INIT_FUNCTIONS)}")
    # transformers' functions read the nested dict themselves when told the layer type.
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    if rope_type == "dynamic":
        # Dynamic NTK with its base fixed for the longest sequence served (as vLLM does).
        kwargs["seq_len"] = max_model_len
    return ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)


def longrope_switch_length(config: PretrainedConfig, layer_type: str | None,
                           max_model_len: int) -> int | None:
    """LongRoPE's original_max_position_embeddings, past which a sequence rotates with the long
    factors; None when the model does not switch (or cannot reach that length)."""
    params = rope_parameters(config, layer_type)
    if params.get("rope_type", params.get("type")) != "longrope":
        return None
    original = (params.get("original_max_position_embeddings")
                or getattr(config, "original_max_position_embeddings", None))
    return original if original and original < max_model_len else None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryEmbedding(nn.Module):
    """Neox-style rotation (the halves of each head are rotated together), as in HF Llama."""

    def __init__(self, config: PretrainedConfig, head_dim: int, max_model_len: int,
                 layer_type: str | None = None) -> None:
        super().__init__()
        self.config, self.max_model_len, self.layer_type = config, max_model_len, layer_type
        self.rotary_dim = int(head_dim * partial_rotary_factor(config, layer_type))
        # fixed by the config; read on every forward pass, so worked out once here
        self.long_after = longrope_switch_length(config, layer_type, max_model_len)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.build_cache()

    def build_cache(self, device: torch.device | str | None = None) -> None:
        """(Re)compute cos/sin in float32; called again after the model moves off 'meta'."""
        tables = [inverse_frequencies(self.config, self.rotary_dim, self.max_model_len,
                                      self.layer_type)]
        if self.long_after is not None:  # transformers picks long_factor when seq_len exceeds it
            tables.append(ROPE_INIT_FUNCTIONS["longrope"](self.config, None,
                                                          seq_len=self.long_after + 1))
        positions = torch.arange(self.max_model_len, dtype=torch.float)
        angles = [torch.cat((f, f), dim=-1) for f in (torch.outer(positions, inv_freq)
                                                      for inv_freq, _ in tables)]
        device = device or self.cos.device
        self.cos = torch.cat([a.cos() * scaling for a, (_, scaling) in zip(angles, tables)]).to(device)
        self.sin = torch.cat([a.sin() * scaling for a, (_, scaling) in zip(angles, tables)]).to(device)

    def table_rows(self, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """The cos/sin row of each token: its position, moved to the long half of a LongRoPE
        table when its sequence is longer than the original context after this step."""
        if self.long_after is None:
            return positions
        lengths = metadata.sequence_length_per_token(positions.shape[0])
        return positions + (lengths > self.long_after) * self.max_model_len

    def forward(self, positions: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query/key: [tokens, heads, head_dim]. On CPU they are rotated in place."""
        ops = kernels_for(query, key)
        if ops is not None and query.stride(1) == query.shape[2] == key.stride(1):
            ops.rotary_embedding(positions, query, key, self.cos, self.sin)
            return query, key
        cos = self.cos[positions].unsqueeze(1).to(query.dtype)
        sin = self.sin[positions].unsqueeze(1).to(query.dtype)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == x.shape[-1]:
            return x * cos + rotate_half(x) * sin
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)
