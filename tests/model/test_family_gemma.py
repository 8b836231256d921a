"""Gemma, Gemma 2 and Gemma 3 on tiny random models built locally with transformers, through the
engine with prefix caching and chunked prefill (a 16-token step budget splits the longer prompts).

The windowed configs use an 8-token window (half a 16-token block) with prompts up to 40 tokens
and 20 generated tokens, so most queries see only part of their context and the window's edge
crosses block boundaries. Final-logit soft-capping cannot change a greedy argmax (tanh is
monotonic); only the logprob comparison can see it, so every test compares logprobs too.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import assert_matches_transformers, save_tiny_model, tiny_engine
from transformers import Gemma2Config, Gemma3Config, Gemma3TextConfig, GemmaConfig
from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding

from pagedllm.model.gemma import rounded

# head_dim 32 differs from hidden_size / heads (16), and query_pre_attn_scalar (24) from
# head_dim: each must come from the config.
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, vocab_size=512, max_position_embeddings=256)
# Not alternating, so that reading the layer kinds from their parity would be caught.
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
WINDOWED = dict(num_hidden_layers=4, layer_types=LAYER_TYPES, sliding_window=8,
                query_pre_attn_scalar=24)

FAMILIES = {
    "gemma": lambda: GemmaConfig(**TINY, num_hidden_layers=2),
    # Caps small enough to change these random models' scores (ignoring the attention cap
    # changes the tokens) and logits.
    "gemma2": lambda: Gemma2Config(**TINY, **WINDOWED, attn_logit_softcapping=1.0,
                                   final_logit_softcapping=3.0),
    # A local rope base far from the global one, and linear scaling on the global layers only.
    # attn_logit_softcapping is set, but transformers' Gemma 3 does not apply it (nor do we).
    "gemma3": lambda: Gemma3TextConfig(**TINY, **WINDOWED, rope_local_base_freq=100.0,
                                       rope_scaling={"rope_type": "linear", "factor": 4.0},
                                       attn_logit_softcapping=1.0, final_logit_softcapping=3.0),
}

# The third and fourth share a 32-token prefix (the fourth reuses its cached blocks); the last is
# 40 tokens of no pattern, five windows long.
SHARED = [42] * 20 + list(range(100, 112))
PROMPTS = [[5, 17, 99, 3], [250, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], SHARED + [7],
           SHARED + [8, 9, 10], [(37 * i + 11) % 509 for i in range(40)]]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return folder, save_tiny_model(FAMILIES[request.param](), folder, norm_noise=0.3)


def test_greedy_and_logprobs_match_transformers(tiny_model):
    folder, hf_model = tiny_model
    llm = tiny_engine(folder)
    for _ in range(2):  # the second pass runs with every prompt's blocks already cached
        assert_matches_transformers(llm, hf_model, PROMPTS, 20, logprobs=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_embedding_normalizer_is_rounded_like_transformers(dtype):
    """sqrt(hidden_size) is rounded to the model's dtype before it scales the embeddings."""
    hidden = 2304  # Gemma 2 2B: sqrt is 48.0, exact; try the awkward neighbour as well
    for size in (hidden, hidden + 1):
        theirs = GemmaTextScaledWordEmbedding(4, size, 0, embed_scale=size**0.5).to(dtype)
        ids = torch.tensor([1, 3])
        expected = theirs(ids)
        ours = theirs.weight[ids] * rounded(size**0.5, dtype)
        assert torch.equal(ours, expected)


def test_multimodal_gemma3_checkpoint_gives_its_text_model(tmp_path):
    """A "gemma3" (image and text) checkpoint keeps the text model under other names beside a
    vision tower; the loader serves its text model alone, with transformers' greedy tokens and
    logprobs for text prompts."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=dict(TINY, **WINDOWED, rope_local_base_freq=100.0),
                          vision_config=vision, mm_tokens_per_image=4, image_token_index=500,
                          boi_token_index=501, eoi_token_index=502)
    hf_model = save_tiny_model(config, tmp_path, norm_noise=0.3)
    llm = tiny_engine(tmp_path)
    assert llm.llm_engine.model_config.hf_config.model_type == "gemma3_text"
    assert_matches_transformers(llm, hf_model, PROMPTS[-2:], 8, logprobs=0)
