"""Qwen3: the Llama decoder plus an RMSNorm over each q/k head before rotary.

Differences from Qwen2 that matter here: no q/k/v bias (unless attention_bias), head_dim comes
from the config (it need not be hidden_size / heads), and `q_norm`/`k_norm` (weights of size
head_dim) normalize every head of q and k. Everything else is the shared Llama code.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from pagedllm.attention import AttentionBackend
from pagedllm.model.layers.norm import RMSNorm
from pagedllm.model.layers.rotary import RotaryEmbedding
from pagedllm.model.llama import LlamaAttention, LlamaForCausalLM
from pagedllm.model.pipeline import MissingModule


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding,
                 backend: AttentionBackend, sliding_window: int | None = None) -> None:
        super().__init__(config, rotary, backend, sliding_window)
        # Named as in the checkpoint so that the generic loader fills them.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q/k are strided views into the fused qkv output; reshaping to [rows, head_dim] makes
        # them contiguous, so the norm takes the C++ kernel and rotary can rotate in place.
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(-1, self.num_heads, self.head_dim)
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(-1, self.num_kv_heads, self.head_dim)
        return q, k


class Qwen3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: PretrainedConfig, max_model_len: int,
                 backend: AttentionBackend) -> None:
        super().__init__(config, max_model_len, backend)
        # Swap each layer's attention for the q/k-norm one, sharing its rotary table and
        # backend (models are built on 'meta', so the discarded modules cost nothing).
        for layer in self.model.layers:
            if isinstance(layer, MissingModule):
                continue  # another pipeline stage's
            old = layer.self_attn
            layer.self_attn = Qwen3Attention(config, old.rotary, old.backend, old.sliding_window)
