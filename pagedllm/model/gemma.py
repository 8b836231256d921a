"""Gemma and Gemma 2: the Llama decoder with Gemma's conventions.

Gemma:   embeddings * sqrt(hidden_size); (1 + w) RMSNorms (GemmaRMSNorm folds the + 1 in at load);
         GeGLU MLP (tanh GELU); head_dim from the config; tied embeddings.
Gemma 2: a norm on each branch's output as well as its input (the "sandwich"),

             x -> norm -> attention -> norm -> + x -> norm -> MLP -> norm -> + x

         scores scaled by query_pre_attn_scalar**-0.5 and soft-capped (c * tanh(s / c)) in the
         attention backend, final logits soft-capped, and a sliding window on the layers that
         config.layer_types marks "sliding_attention" (see llama.sliding_windows).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from transformers import PretrainedConfig

from pagedllm.attention import AttentionBackend
from pagedllm.attention.torch_backend import cap_scores
from pagedllm.model.layers.activation import GeluAndMul
from pagedllm.model.layers.norm import GemmaRMSNorm
from pagedllm.model.layers.rotary import RotaryEmbedding
from pagedllm.model.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
)


@functools.cache
def rounded(value: float, dtype: torch.dtype) -> float:
    """`value` as the nearest number of `dtype`: transformers casts the embedding normalizer
    to the model's dtype before multiplying (sqrt(2048) is 45.25 in bfloat16, not 45.2548)."""
    return torch.tensor(value, dtype=torch.float32).to(dtype).item()


class GemmaAttention(LlamaAttention):
    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding,
                 backend: AttentionBackend, sliding_window: int | None = None) -> None:
        super().__init__(config, rotary, backend, sliding_window)
        # Gemma 2/3 scale scores by a configured scalar instead of head_dim (Gemma has neither).
        scalar = getattr(config, "query_pre_attn_scalar", None)
        if scalar is not None:
            self.scale = scalar**-0.5
        self.soft_cap = getattr(config, "attn_logit_softcapping", None)


class GemmaMLP(LlamaMLP):
    # Gemma's config names its activation hidden_act (transformers maps the legacy "gelu" to
    # the tanh approximation there); Gemma 2/3 read hidden_activation.
    activation_attr = "hidden_act"

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.act = GeluAndMul(getattr(config, self.activation_attr))


class GemmaDecoderLayer(LlamaDecoderLayer):
    attention_class = GemmaAttention
    mlp_class = GemmaMLP
    norm_class = GemmaRMSNorm


class GemmaModel(LlamaModel):
    layer_class = GemmaDecoderLayer

    def __init__(self, config: PretrainedConfig, max_model_len: int,
                 backend: AttentionBackend) -> None:
        super().__init__(config, max_model_len, backend)
        self.normalizer = config.hidden_size**0.5

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        return hidden * rounded(self.normalizer, hidden.dtype)


class GemmaForCausalLM(LlamaForCausalLM):
    model_class = GemmaModel

    def __init__(self, config: PretrainedConfig, max_model_len: int,
                 backend: AttentionBackend) -> None:
        super().__init__(config, max_model_len, backend)
        self.final_soft_cap = getattr(config, "final_logit_softcapping", None)
        # Checkpoint names of the (1 + w) norms, whose weights are folded as they load.
        self.gemma_norm_weights = {f"{name}.weight" for name, module in self.named_modules()
                                   if isinstance(module, GemmaRMSNorm)}

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        # One helper for the formula, tanh(x / c) * c in transformers' order of operations:
        # the attention scores get the same cap.
        logits = self.lm_head(hidden)
        return None if logits is None else cap_scores(logits, self.final_soft_cap)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(
            (name, GemmaRMSNorm.fold(tensor) if name in self.gemma_norm_weights else tensor)
            for name, tensor in weights
        )


class Gemma2MLP(GemmaMLP):
    activation_attr = "hidden_activation"


class Gemma2DecoderLayer(GemmaDecoderLayer):
    mlp_class = Gemma2MLP

    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding,
                 backend: AttentionBackend, sliding_window: int | None = None) -> None:
        super().__init__(config, rotary, backend, sliding_window)
        self.pre_feedforward_layernorm = self.norm_class(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = self.norm_class(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, kv_cache, metadata):
        """Returns (this layer's normalized MLP output, the residual stream before it is added);
        each "+ x" is fused into the pre-norm that follows it, as in the Llama layer."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, metadata)
        hidden = self.post_attention_layernorm(hidden)
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2Model(GemmaModel):
    layer_class = Gemma2DecoderLayer


class Gemma2ForCausalLM(GemmaForCausalLM):
    model_class = Gemma2Model
