"""Llama-family variants on tiny random models built locally with transformers."""

from __future__ import annotations

import pytest
from conftest import make_llm
from tiny_models import save_tiny_model, transformers_greedy
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
    "qwen2": lambda: Qwen2Config(**TINY, tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return folder, save_tiny_model(FAMILIES[request.param](), folder)


def test_greedy_matches_transformers(tiny_model):
    folder, hf_model = tiny_model
    llm = make_llm(model=str(folder), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20)
    prompts = [[5, 17, 99, 3], [250, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [42] * 30]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                           use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == transformers_greedy(hf_model, prompt, 20)
