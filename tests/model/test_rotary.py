"""Our rotary tables equal transformers' for every rope_scaling variant we accept."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from pagedllm.model.layers.rotary import RotaryEmbedding

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: (s or {}).get("rope_type", "default"))
def test_cos_sin_match_transformers(scaling):
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                         rope_theta=10000.0, rope_scaling=scaling)
    ours = RotaryEmbedding(config, head_dim=16, max_model_len=256)
    theirs = LlamaRotaryEmbedding(config)
    positions = torch.arange(0, 256, 7)
    cos, sin = theirs(torch.zeros(1, 1, 16), positions.unsqueeze(0))
    torch.testing.assert_close(ours.cos[positions], cos[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.sin[positions], sin[0], rtol=1e-5, atol=1e-6)


def test_unknown_rope_type_is_rejected():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4)
    config.rope_parameters = {"rope_type": "spiral", "rope_theta": 1e4}
    with pytest.raises(ValueError, match="unsupported rope type"):
        RotaryEmbedding(config, head_dim=16, max_model_len=32)
