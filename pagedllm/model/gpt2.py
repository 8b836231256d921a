"""GPT-2: the LayerNorm decoder with learned positions, tanh-GELU ("gelu_new") and tied lm_head.

Checkpoint quirks handled here: projections are Conv1D, stored [in, out] (the transpose of
nn.Linear); q|k|v come already fused in one `c_attn`; names may or may not carry the
`transformer.` prefix (the original OpenAI-converted files have none); and older files hold
the causal-mask buffers `attn.bias` / `attn.masked_bias`, which are not weights.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from pagedllm.attention import AttentionBackend
from pagedllm.model.layernorm_decoder import DecoderSpec, LayerNormDecoderForCausalLM

# GPT-2 layer-local names -> ours (under model.layers.N)
LAYER_NAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "self_attn.qkv_proj",
    "attn.c_proj": "self_attn.out_proj",
    "ln_2": "mlp_norm",
    "mlp.c_fc": "fc1",
    "mlp.c_proj": "fc2",
}
GLOBAL_NAMES = {"wte": "model.embed_tokens", "wpe": "model.embed_positions", "ln_f": "model.norm",
                "lm_head": "lm_head"}
CONV1D_MODULES = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
MASK_BUFFERS = {"attn.bias", "attn.masked_bias"}


def gpt2_spec(config: PretrainedConfig) -> DecoderSpec:
    head_dim = config.n_embd // config.n_head
    # GPT-2 can switch the 1/sqrt(d) scale off, and some runs (Stanford CRFM) also divide it by layer+1
    base = head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
    by_layer = getattr(config, "scale_attn_by_inverse_layer_idx", False)
    return DecoderSpec(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        num_heads=config.n_head,
        num_layers=config.n_layer,
        intermediate_size=config.n_inner or 4 * config.n_embd,
        activation=config.activation_function,
        eps=config.layer_norm_epsilon,
        position_rows=config.n_positions,
        layer_scales=[base / (i + 1) if by_layer else base for i in range(config.n_layer)],
        tie_word_embeddings=getattr(config, "tie_word_embeddings", True),
    )


class GPT2LMHeadModel(LayerNormDecoderForCausalLM):
    def __init__(self, config: PretrainedConfig, max_model_len: int,
                 backend: AttentionBackend) -> None:
        super().__init__(gpt2_spec(config), backend)
        self.config = config

    def map_weight(self, name: str,
                   tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        name = name.removeprefix("transformer.")
        module, param = name.rsplit(".", 1)
        if module in GLOBAL_NAMES:
            return f"{GLOBAL_NAMES[module]}.{param}", tensor
        parts = module.split(".", 2)  # "h", layer index, layer-local module
        if len(parts) != 3 or parts[0] != "h":
            raise ValueError(f"checkpoint has an unexpected weight {name!r}")
        local = parts[2]
        if name.split(".", 2)[2] in MASK_BUFFERS:
            return None
        if local not in LAYER_NAMES:
            raise ValueError(f"checkpoint has an unexpected weight {name!r}")
        if local in CONV1D_MODULES and param == "weight":
            tensor = tensor.t()  # Conv1D keeps [in, out]; nn.Linear wants [out, in]
        return f"model.layers.{parts[1]}.{LAYER_NAMES[local]}.{param}", tensor
