"""Llama-family variants on tiny random models built locally with transformers, through the
engine with prefix caching and chunked prefill (a 16-token step budget splits the longer prompts).

The windowed variants use an 8-token window (half a block) and a 40-token prompt, so most
queries see only part of their context and the window's edge crosses block boundaries.
"""

from __future__ import annotations

import pytest
from conftest import make_llm
from tiny_models import assert_logprobs_match, save_tiny_model, transformers_greedy
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from pagedllm import SamplingParams, TokensPrompt

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
    llm = make_llm(model=str(folder), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20,
                   enable_prefix_caching=True, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, detokenize=False,
                            logprobs=3)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params,
                           use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        completion = output.outputs[0]
        assert completion.token_ids == transformers_greedy(hf_model, prompt, 20)
        assert_logprobs_match(hf_model, prompt, completion)
