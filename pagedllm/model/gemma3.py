"""Gemma 3 (text): the Gemma 2 sandwich decoder plus per-head q/k norms and two rotary tables.

- q_norm / k_norm: a (1 + w) RMSNorm over every head of q and k, before rotary (as Qwen3, but
  Gemma-style weights).
- Rotary: transformers 5 keeps one rope dict per layer type in config.rope_parameters; the local
  ("sliding_attention") layers use their own base (the old rope_local_base_freq, 10k) and the
  global ("full_attention") layers carry the base 1M and any rope scaling. One table per type,
  shared by the layers of that type.
- config.layer_types picks each layer's window (five local layers to one global in the released
  models); query_pre_attn_scalar sets the score scale; final_logit_softcapping caps the logits.
- attn_logit_softcapping is not applied: transformers' Gemma 3 attention never passes it on (the
  released configs leave it null), and we match transformers.

A multimodal "gemma3" checkpoint keeps the text model under `model.language_model.` (older saves:
`language_model.model.`); `load_weights` maps those names and skips the vision tower, so the
model loads once the loader hands it `config.get_text_config()`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from transformers import PretrainedConfig

from pagedllm.attention import AttentionBackend
from pagedllm.model.gemma import Gemma2DecoderLayer, GemmaAttention, GemmaForCausalLM, GemmaModel
from pagedllm.model.layers.norm import GemmaRMSNorm
from pagedllm.model.layers.rotary import RotaryEmbedding
from pagedllm.utils import head_dim_of

# multimodal checkpoint prefix -> ours; weights under SKIPPED_PREFIXES belong to the vision side
TEXT_PREFIXES = {
    "model.language_model.": "model.",
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
}
SKIPPED_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                    "multi_modal_projector.")


class Gemma3Attention(GemmaAttention):
    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding,
                 backend: AttentionBackend, sliding_window: int | None = None) -> None:
        super().__init__(config, rotary, backend, sliding_window)
        self.soft_cap = None  # see the module docstring
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [rows, head_dim] copies are contiguous: the norm takes the C++ kernel and rotary can
        # rotate them in place.
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(-1, self.num_heads, self.head_dim)
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(-1, self.num_kv_heads, self.head_dim)
        return q, k


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    attention_class = Gemma3Attention


class Gemma3Model(GemmaModel):
    layer_class = Gemma3DecoderLayer

    def layer_rotaries(self, config: PretrainedConfig,
                       max_model_len: int) -> list[RotaryEmbedding]:
        tables = {kind: RotaryEmbedding(config, head_dim_of(config), max_model_len, kind)
                  for kind in dict.fromkeys(config.layer_types)}
        return [tables[kind] for kind in config.layer_types]


class Gemma3ForCausalLM(GemmaForCausalLM):
    model_class = Gemma3Model

    def __init__(self, config: PretrainedConfig, max_model_len: int,
                 backend: AttentionBackend) -> None:
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Gemma 3 with use_bidirectional_attention (an embedding model) is "
                             "not supported: this engine serves causal language models")
        super().__init__(config, max_model_len, backend)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(text_weights(weights))


def text_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """A multimodal checkpoint's text-model weights under the text-only names."""
    for name, tensor in weights:
        if name.startswith(SKIPPED_PREFIXES):
            continue
        for prefix, ours in TEXT_PREFIXES.items():
            if name.startswith(prefix):
                name = ours + name[len(prefix):]
                break
        yield name, tensor
