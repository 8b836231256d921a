"""OPT: the LayerNorm decoder with ReLU, separate biased q/k/v/out projections and learned
positions whose table starts at an offset of 2 (rows 0 and 1 are a fairseq leftover).

OPT-350m differs from its siblings: post-norm layers (do_layer_norm_before=False, and then no
final LayerNorm) and a token embedding narrower than the residual stream, bridged by
project_in/project_out. Checkpoint names come as `model.decoder.*` (transformers) or
`decoder.*` (the original conversions).
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from pagedllm.attention import AttentionBackend
from pagedllm.model.layernorm_decoder import (
    DecoderSpec,
    LayerNormDecoderForCausalLM,
    rename_pieces,
)

POSITION_OFFSET = 2
LAYER_NORM_EPS = 1e-5  # OPT uses nn.LayerNorm's default; its config has no epsilon
GLOBAL_NAMES = {"embed_tokens", "embed_positions", "project_in", "project_out"}
# OPT layer-local name pieces -> ours; q/k/v/out_proj and fc1/fc2 keep their names
LAYER_PIECES = {"self_attn_layer_norm": "attn_norm", "final_layer_norm": "mlp_norm"}


def opt_spec(config: PretrainedConfig) -> DecoderSpec:
    pre_norm = config.do_layer_norm_before
    return DecoderSpec(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_layers=config.num_hidden_layers,
        intermediate_size=config.ffn_dim,
        activation=config.activation_function,
        eps=LAYER_NORM_EPS,
        position_rows=config.max_position_embeddings + POSITION_OFFSET,
        position_offset=POSITION_OFFSET,
        norm_before=pre_norm,
        final_norm=pre_norm and not getattr(config, "_remove_final_layer_norm", False),
        embed_dim=config.word_embed_proj_dim,
        bias=getattr(config, "enable_bias", True),
        norm_affine=getattr(config, "layer_norm_elementwise_affine", True),
        tie_word_embeddings=getattr(config, "tie_word_embeddings", True),
    )


class OPTForCausalLM(LayerNormDecoderForCausalLM):
    def __init__(self, config: PretrainedConfig, max_model_len: int,
                 backend: AttentionBackend) -> None:
        super().__init__(opt_spec(config), backend)
        self.config = config

    def map_weight(self, name: str,
                   tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        if name.startswith("lm_head."):
            return name, tensor
        local = name.removeprefix("model.").removeprefix("decoder.")
        head = local.split(".", 1)[0]
        if head in GLOBAL_NAMES:
            return f"model.{local}", tensor
        if head == "final_layer_norm":  # the decoder's own, after the last layer
            return f"model.norm.{local.split('.', 1)[1]}", tensor
        if head == "layers":
            return f"model.{rename_pieces(local, LAYER_PIECES)}", tensor
        raise ValueError(f"checkpoint has an unexpected weight {name!r}")
