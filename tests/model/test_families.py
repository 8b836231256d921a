"""Llama-family variants on tiny random models built locally with transformers, through the
engine with prefix caching and chunked prefill (a 16-token step budget splits the longer prompts).

The windowed variants use an 8-token window (half a block) and a 40-token prompt, so most
queries see only part of their context and the window's edge crosses block boundaries.
"""

from __future__ import annotations

import pytest
from tiny_models import assert_matches_transformers, save_tiny_model, tiny_engine
from transformers import LlamaConfig, MistralConfig, Qwen2Config

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
FAMILIES = {
    "llama": lambda: LlamaConfig(**TINY, tie_word_embeddings=False),
    "llama-tied-llama3-rope": lambda: LlamaConfig(**TINY, tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=None),
    "mistral-window": lambda: MistralConfig(**TINY, sliding_window=8),  # on every layer
    "qwen2": lambda: Qwen2Config(**TINY, tie_word_embeddings=False),
    # layer_types from max_window_layers: layer 0 full, layer 1 windowed.
    "qwen2-window": lambda: Qwen2Config(**TINY, use_sliding_window=True, sliding_window=8,
                                        max_window_layers=1),
}
PROMPTS = [[5, 17, 99, 3], [250, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [42] * 30,
           [(37 * i + 11) % 509 for i in range(40)]]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return folder, save_tiny_model(FAMILIES[request.param](), folder)


def test_greedy_and_logprobs_match_transformers(tiny_model):
    folder, hf_model = tiny_model
    assert_matches_transformers(tiny_engine(folder), hf_model, PROMPTS, 20, logprobs=3)
