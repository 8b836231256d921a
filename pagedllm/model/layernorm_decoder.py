"""The classic LayerNorm decoder shared by GPT-2 and OPT: learned positions, biased attention.

Per layer (pre-norm):   x -> LayerNorm -> qkv_proj -> paged attention -> out_proj -> + x
                          -> LayerNorm -> fc1 -> activation -> fc2 -> + x
Post-norm (OPT-350m) normalizes after each "+ x" instead. Positions are looked up in a learned
table (OPT's starts at an offset of 2); there is no rotary embedding. Each family file only
describes its config (`DecoderSpec`) and maps its checkpoint names onto these modules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from pagedllm.attention import AttentionBackend, AttentionMetadata
from pagedllm.attention.kv_quant import KVScales
from pagedllm.model.layers.linear import (
    ColumnParallelLinear,
    Linear,
    ParallelLMHead,
    QKVLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from pagedllm.model.pipeline import (
    MissingModule,
    elsewhere,
    held,
    held_layers,
    on_other_stage,
    stage_layers,
    this_stage,
)
from pagedllm.model.weights import copy_checked

KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_layers: int
    intermediate_size: int
    activation: str  # a transformers ACT2FN name, so "gelu_new" means exactly what it means there
    eps: float
    position_rows: int  # rows in the learned position table
    position_offset: int = 0  # OPT's table starts at 2
    norm_before: bool = True  # pre-norm; False: normalize after each residual add
    final_norm: bool = True
    embed_dim: int | None = None  # token-embedding width when it differs (OPT's project_in/out)
    bias: bool = True
    norm_affine: bool = True
    # per-layer softmax scale; None means head_dim**-0.5 everywhere
    layer_scales: list[float] | None = None
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class BiasedSelfAttention(nn.Module):
    """Multi-head attention (no grouped KV) through the paged backend; fused q|k|v matmul."""

    def __init__(self, spec: DecoderSpec, scale: float, backend: AttentionBackend) -> None:
        super().__init__()
        self.head_dim = spec.head_dim
        size = spec.hidden_size
        self.qkv_proj = QKVLinear(size, spec.num_heads, spec.num_heads, self.head_dim,
                                  bias=spec.bias)
        self.num_heads = self.qkv_proj.num_heads  # this rank's
        self.out_proj = RowParallelLinear(size, size, bias=spec.bias)
        self.backend, self.scale = backend, scale
        self.kv_scales = KVScales()  # an fp8 KV cache's scales (attention/kv_quant.py)

    def forward(self, hidden: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.qkv_proj.output_sizes, dim=-1)
        shape = (-1, self.num_heads, self.head_dim)
        out = self.backend.forward(q.reshape(shape), k.reshape(shape), v.reshape(shape),
                                   kv_cache, metadata, self.scale, kv_scales=self.kv_scales)
        return self.out_proj(out.reshape(-1, self.num_heads * self.head_dim))


class LayerNormDecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, scale: float, backend: AttentionBackend) -> None:
        super().__init__()
        self.norm_before = spec.norm_before
        self.attn_norm = nn.LayerNorm(spec.hidden_size, spec.eps,
                                      elementwise_affine=spec.norm_affine)
        self.self_attn = BiasedSelfAttention(spec, scale, backend)
        self.mlp_norm = nn.LayerNorm(spec.hidden_size, spec.eps,
                                     elementwise_affine=spec.norm_affine)
        self.fc1 = ColumnParallelLinear(spec.hidden_size, spec.intermediate_size, bias=spec.bias)
        self.act = ACT2FN[spec.activation]
        self.fc2 = RowParallelLinear(spec.intermediate_size, spec.hidden_size, bias=spec.bias)

    def forward(self, hidden: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        if self.norm_before:
            hidden = hidden + self.self_attn(self.attn_norm(hidden), kv_cache, metadata)
            return hidden + self.fc2(self.act(self.fc1(self.mlp_norm(hidden))))
        hidden = self.attn_norm(hidden + self.self_attn(hidden, kv_cache, metadata))
        return self.mlp_norm(hidden + self.fc2(self.act(self.fc1(hidden))))


class LayerNormDecoder(nn.Module):
    def __init__(self, spec: DecoderSpec, backend: AttentionBackend) -> None:
        super().__init__()
        embed_dim = spec.embed_dim or spec.hidden_size
        self.position_offset = spec.position_offset
        # pipeline parallelism: the embeddings on the first stage (the token one on the last
        # too when lm_head shares its weight), the final norm and projection on the last
        self.stage = stage = this_stage(spec.num_layers)
        self.embed_tokens = held(stage.is_first or (stage.is_last and spec.tie_word_embeddings),
                                 lambda: VocabParallelEmbedding(spec.vocab_size, embed_dim))
        self.embed_positions = held(stage.is_first, lambda: nn.Embedding(spec.position_rows,
                                                                         spec.hidden_size))
        # OPT-350m embeds tokens narrower than the residual stream and projects in and out
        narrow = embed_dim != spec.hidden_size
        self.project_in = held(stage.is_first, lambda: Linear(
            embed_dim, spec.hidden_size, bias=False)) if narrow else None
        self.project_out = held(stage.is_last, lambda: Linear(
            spec.hidden_size, embed_dim, bias=False)) if narrow else None
        scales = spec.layer_scales or [spec.head_dim**-0.5] * spec.num_layers
        self.layers = stage_layers(stage, spec.num_layers, lambda i: LayerNormDecoderLayer(
            spec, scales[i], backend))
        self.norm = held(stage.is_last, lambda: nn.LayerNorm(
            spec.hidden_size, spec.eps, elementwise_affine=spec.norm_affine)) \
            if spec.final_norm else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], metadata: AttentionMetadata,
                intermediate: tuple[torch.Tensor] | None = None):
        """The final hidden states; on a pipeline stage before the last, (hidden,) for the
        next stage, which passes it back in as `intermediate`."""
        if intermediate is None:
            hidden = self.embed_tokens(input_ids)
            if self.project_in is not None:
                hidden = self.project_in(hidden)
            hidden = hidden + self.embed_positions(positions + self.position_offset)
        else:
            (hidden,) = intermediate
        for layer, kv_cache in zip(held_layers(self.layers, self.stage), kv_caches, strict=True):
            hidden = layer(hidden, kv_cache, metadata)
        if not self.stage.is_last:
            return (hidden,)
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


# our parameter name piece -> shard of the fused q|k|v projection (OPT stores them apart)
QKV_SHARDS = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


class LayerNormDecoderForCausalLM(nn.Module):
    """The model interface the engine expects; a family subclass supplies `spec_from_config`
    and `map_weight` (checkpoint name and tensor -> our name and tensor, or None to skip)."""

    def __init__(self, spec: DecoderSpec, backend: AttentionBackend) -> None:
        super().__init__()
        self.model = LayerNormDecoder(spec, backend)
        self.hidden_size = spec.hidden_size
        self.lm_head = held(self.model.stage.is_last, lambda: ParallelLMHead(
            spec.embed_dim or spec.hidden_size, spec.vocab_size))
        # the loader re-ties after moving off 'meta'; it looks for exactly these names
        self.tie_word_embeddings = spec.tie_word_embeddings
        if self.tie_word_embeddings and not isinstance(self.lm_head, MissingModule):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, kv_caches, metadata, intermediate=None):
        return self.model(input_ids, positions, kv_caches, metadata, intermediate)

    def intermediate_buffers(self, num_tokens: int, dtype: torch.dtype,
                             device: torch.device) -> tuple[torch.Tensor]:
        """An empty hidden state of the shape a previous pipeline stage sends."""
        return (torch.empty(num_tokens, self.hidden_size, dtype=dtype, device=device),)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """None on a tensor-parallel rank other than the first (see ParallelLMHead)."""
        return self.lm_head(hidden)

    def map_weight(self, name: str,
                   tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into our modules; every parameter must be filled."""
        params = dict(self.named_parameters())
        missing = set(params)
        other_stages = elsewhere(self)
        for hf_name, hf_tensor in weights:
            mapped = self.map_weight(hf_name, hf_tensor)
            if mapped is None or on_other_stage(mapped[0], other_stages):
                continue
            name, tensor = mapped
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # the same tensor as the token embedding
            missing.discard(self._load_one(name, tensor, params))
        if self.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:8]}")

    def _load_one(self, name: str, tensor: torch.Tensor, params: dict) -> str:
        module_name, param_name = name.rsplit(".", 1)
        parent, _, piece = module_name.rpartition(".")
        if piece in QKV_SHARDS:
            fused = f"{parent}.qkv_proj"
            if f"{fused}.{param_name}" not in params:
                raise ValueError(f"checkpoint has an unexpected weight {name!r}")
            self.get_submodule(fused).load_shard(param_name, QKV_SHARDS[piece], tensor)
            return f"{fused}.{param_name}"
        copy_checked(params, name, tensor)
        return name


def rename_pieces(name: str, table: dict[str, str]) -> str:
    """Replace whole dotted pieces of a name by the table (e.g. 'ln_1' -> 'attn_norm')."""
    return ".".join(table.get(piece, piece) for piece in name.split("."))

