"""Qwen3 and Phi-3 on tiny random models built locally with transformers, through the engine
with prefix caching and chunked prefill (a 16-token step budget splits the longer prompts)."""

from __future__ import annotations

import pytest
from tiny_models import assert_matches_transformers, save_tiny_model, tiny_engine
from transformers import Phi3Config, Qwen3Config

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)


def longrope(rotary_dim: int, partial: float = 1.0) -> dict:
    """Distinct short/long factors, so picking the wrong list would change the tokens; our
    sequences stay below original_max_position_embeddings, where transformers uses 'short'."""
    half = rotary_dim // 2
    return {"rope_type": "longrope", "partial_rotary_factor": partial,
            "short_factor": [1.0 + 0.25 * i for i in range(half)],
            "long_factor": [4.0 + 2.0 * i for i in range(half)]}


# Phi3Config's default special ids (32000) lie outside the tiny vocabulary.
PHI3_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    # head_dim 32 differs from hidden_size / heads (16): it must come from the config.
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False),
    "qwen3-tied": lambda: Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=True),
    "phi3": lambda: Phi3Config(**TINY, **PHI3_IDS),
    "phi3-longrope": lambda: Phi3Config(**TINY, **PHI3_IDS,
                                        original_max_position_embeddings=128,
                                        rope_scaling=longrope(16)),
    # transformers 5 keeps partial_rotary_factor inside rope_parameters.
    "phi3-partial": lambda: Phi3Config(**TINY, **PHI3_IDS, partial_rotary_factor=0.5),
    # Phi-4-mini style: only 3/4 of each head is rotated.
    "phi3-longrope-partial": lambda: Phi3Config(**TINY, **PHI3_IDS,
                                                original_max_position_embeddings=128,
                                                rope_scaling=longrope(12, partial=0.75)),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return folder, save_tiny_model(FAMILIES[request.param](), folder)


def test_greedy_and_logprobs_match_transformers(tiny_model):
    folder, hf_model = tiny_model
    llm = tiny_engine(folder)
    # The last two share a 32-token prefix, so the second can reuse cached blocks.
    shared = [42] * 20 + list(range(100, 112))
    prompts = [[5, 17, 99, 3], [250, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], shared + [7],
               shared + [8, 9, 10]]
    for _ in range(2):  # the second pass runs with every prompt's blocks already cached
        assert_matches_transformers(llm, hf_model, prompts, 20, logprobs=2)


def test_longrope_switches_to_long_factors_past_the_original_length(tmp_path):
    """Past original_max_position_embeddings (24 here) transformers rotates with long_factor:
    a whole prompt longer than that from its first token, and a shorter one from the decode step
    that crosses it (earlier keys stay cached as they were rotated)."""
    config = Phi3Config(**TINY, **PHI3_IDS, original_max_position_embeddings=24,
                        rope_scaling=longrope(16))
    hf_model = save_tiny_model(config, tmp_path)
    # a budget of 64 tokens prefills each prompt in one pass, as transformers does
    llm = tiny_engine(tmp_path, enable_prefix_caching=False, max_num_batched_tokens=64)
    prompts = [[(11 * i + 3) % 500 for i in range(10)], [(7 * i + 5) % 500 for i in range(30)]]
    # (no one-pass logprob reference here: one forward over prompt + completion would rotate
    # every position with long factors, unlike the step-by-step generation it should mirror)
    assert_matches_transformers(llm, hf_model, prompts, 24)
