"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM, ...): one decoder, a few config switches.

Per layer:  x -> RMSNorm -> qkv_proj -> rotary -> paged attention -> o_proj -> + x
              -> RMSNorm -> gate_up_proj -> SiLU(gate) * up -> down_proj -> + x
q/k/v and gate/up are fused into one matmul each; the checkpoint's separate tensors are loaded
into their slices (see MergedLinear). The residual stream travels beside the hidden state so
that each "+ x" is fused into the RMSNorm that follows it.

Sliding windows (Mistral, Qwen2/3 with use_sliding_window, Phi-3) are per layer: see
`sliding_windows`. Other families (Gemma) reuse these classes through their class-level hooks:
`LlamaForCausalLM.model_class`, `LlamaModel.layer_class` / `layer_rotaries` / `embed`, and
`LlamaDecoderLayer.attention_class` / `mlp_class` / `norm_class`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedllm.attention import AttentionBackend, AttentionMetadata
from pagedllm.attention.kv_quant import KVScales
from pagedllm.model.layers.activation import SiluAndMul
from pagedllm.model.layers.linear import (
    MergedLinear,
    ParallelLMHead,
    QKVLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from pagedllm.model.layers.norm import RMSNorm
from pagedllm.model.layers.rotary import RotaryEmbedding
from pagedllm.model.pipeline import (
    MissingModule,
    elsewhere,
    held,
    held_layers,
    on_other_stage,
    stage_layers,
    this_stage,
)
from pagedllm.model.weights import copy_checked, load_kv_scale
from pagedllm.utils import head_dim_of

KVCache = tuple[torch.Tensor, torch.Tensor]

# checkpoint name piece -> (fused module name piece, shard index)
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def sliding_windows(config: PretrainedConfig) -> list[int | None]:
    """Each layer's attention window (None: the whole context), as transformers 5 decides it.

    config.layer_types ("sliding_attention" / "full_attention") is the source of truth where the
    config has it: Qwen2/Qwen3 derive it from use_sliding_window and max_window_layers, Gemma 2/3
    from their alternating patterns. Without it (Mistral, Phi-3) config.sliding_window, when
    set, applies to every layer.
    """
    window = getattr(config, "sliding_window", None)
    num_layers = config.num_hidden_layers
    if not window:
        return [None] * num_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [window] * num_layers
    return [window if kind == "sliding_attention" else None for kind in layer_types]


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding,
                 backend: AttentionBackend, sliding_window: int | None = None) -> None:
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.head_dim = head_dim_of(config)
        # Qwen2 has biases on q/k/v only; Llama's attention_bias puts them on o_proj too.
        qkv_bias = getattr(config, "attention_bias", False) or getattr(config, "qkv_bias", False)
        self.qkv_proj = QKVLinear(config.hidden_size, num_heads, num_kv_heads, self.head_dim,
                                  bias=qkv_bias)
        # this rank's heads (all of them without tensor parallelism)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, config.hidden_size,
                                        bias=getattr(config, "attention_bias", False))
        self.rotary = rotary
        self.backend = backend
        self.scale = self.head_dim**-0.5
        self.sliding_window = sliding_window
        self.soft_cap: float | None = None  # Gemma 2 caps attention scores
        self.kv_scales = KVScales()  # an fp8 KV cache's scales (attention/kv_quant.py)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.qkv_proj.output_sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.normalize_qk(q, k)
        q, k = self.rotary(positions, q, k)
        out = self.backend.forward(q, k, v, kv_cache, metadata, self.scale,
                                   sliding_window=self.sliding_window, soft_cap=self.soft_cap,
                                   kv_scales=self.kv_scales)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook before rotary: Llama leaves q/k as they are; Qwen3 RMS-normalizes each head."""
        return q, k


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        size, bias = config.intermediate_size, getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size], bias=bias)
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    attention_class: type[LlamaAttention] = LlamaAttention
    mlp_class: type[nn.Module] = LlamaMLP
    norm_class: type[RMSNorm] = RMSNorm

    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding,
                 backend: AttentionBackend, sliding_window: int | None = None) -> None:
        super().__init__()
        self.self_attn = self.attention_class(config, rotary, backend, sliding_window)
        self.mlp = self.mlp_class(config)
        self.input_layernorm = self.norm_class(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = self.norm_class(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, kv_cache, metadata):
        """Returns (this layer's MLP output, the residual stream before it is added)."""
        if residual is None:  # first layer: the embeddings are the residual stream
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    layer_class: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, config: PretrainedConfig, max_model_len: int,
                 backend: AttentionBackend) -> None:
        super().__init__()
        # pipeline parallelism: this stage's layers (all of them with one stage); the embedding
        # on the first stage, and on the last one too when lm_head shares its weight
        self.stage = stage = this_stage(config.num_hidden_layers)
        tied = getattr(config, "tie_word_embeddings", False)
        self.embed_tokens = held(stage.is_first or (stage.is_last and tied),
                                 lambda: VocabParallelEmbedding(config.vocab_size,
                                                                config.hidden_size))
        rotaries = self.layer_rotaries(config, max_model_len)
        windows = sliding_windows(config)
        self.layers = stage_layers(stage, config.num_hidden_layers, lambda i: self.layer_class(
            config, rotaries[i], backend, windows[i]))
        self.norm = held(stage.is_last, lambda: self.layer_class.norm_class(
            config.hidden_size, config.rms_norm_eps))
        # which cos/sin row each token reads (LongRoPE switches tables with sequence length)
        self.rotary_rows = rotaries[0].table_rows

    def layer_rotaries(self, config: PretrainedConfig,
                       max_model_len: int) -> list[RotaryEmbedding]:
        """Each layer's rotary table: here one table that every layer shares."""
        rotary = RotaryEmbedding(config, head_dim_of(config), max_model_len)
        return [rotary] * config.num_hidden_layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, kv_caches: list[KVCache], metadata,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The final hidden states; on a pipeline stage before the last, (hidden, residual)
        for the next stage, which passes them back in as `intermediate`. `kv_caches`: this
        stage's layers' caches."""
        positions = self.rotary_rows(positions, metadata)
        if intermediate is None:
            hidden, residual = self.embed(input_ids), None
        else:
            hidden, residual = intermediate
        for layer, kv_cache in zip(held_layers(self.layers, self.stage), kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        if not self.stage.is_last:
            return hidden, residual
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    model_class: type[LlamaModel] = LlamaModel

    def __init__(self, config: PretrainedConfig, max_model_len: int,
                 backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.model = self.model_class(config, max_model_len, backend)
        self.lm_head = held(self.model.stage.is_last,
                            lambda: ParallelLMHead(config.hidden_size, config.vocab_size))
        self.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
        if self.tie_word_embeddings and not isinstance(self.lm_head, MissingModule):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, kv_caches, metadata, intermediate=None):
        return self.model(input_ids, positions, kv_caches, metadata, intermediate)

    def intermediate_buffers(self, num_tokens: int, dtype: torch.dtype,
                             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty (hidden, residual) of the shapes a previous pipeline stage sends."""
        width = self.config.hidden_size
        return (torch.empty(num_tokens, width, dtype=dtype, device=device),
                torch.empty(num_tokens, width, dtype=dtype, device=device))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The logits of `hidden`'s rows; None on a tensor-parallel rank other than the first
        (they are gathered where sampling happens)."""
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (HF names) into our modules; every parameter must be filled."""
        params = dict(self.named_parameters())
        missing = set(params)
        other_stages = elsewhere(self)
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if on_other_stage(name, other_stages):
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            if load_kv_scale(self, name, tensor):
                continue
            target = self._load_one(name, tensor, params)
            missing.discard(target)
        if self.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:8]}")

    def _load_one(self, name: str, tensor: torch.Tensor, params: dict) -> str:
        for piece, (fused, shard) in STACKED_PARAMS.items():
            if f".{piece}." in name:
                fused_name = name.replace(f".{piece}.", f".{fused}.")
                module_name, param_name = fused_name.rsplit(".", 1)
                self.get_submodule(module_name).load_shard(param_name, shard, tensor)
                return fused_name
        copy_checked(params, name, tensor)
        return name
