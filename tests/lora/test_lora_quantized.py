"""LoRA on a base model kept quantized: the bundled SmolLM2 GGUF (Q4_1/Q6_K blocks, run by the
GGUF kernels) with an adapter made with peft on its dequantized weights gives transformers +
peft's greedy tokens and logprobs on those weights."""

from __future__ import annotations

import pytest
from lora_models import ALL, lora, peft_reference
from tiny_models import assert_logprobs_match, transformers_greedy

from benchmarks.lora_throughput import write_adapter
from pagedllm import LLM, SamplingParams, TokensPrompt
from pagedllm.model.layers.lora import LoRALinear
from pagedllm.model.layers.quantization.gguf import GGUFLinear
from pagedllm.model.source import default_model_path

PROMPTS = [[1, 504, 3458, 282, 4797, 314], list(range(200, 230))]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def adapter(reference_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf-lora") / "adapter"
    # A and B drawn at 0.05: enough to change the greedy tokens, not so much that the adapter
    # drowns the model (at the tiny models' 0.3 the logits grow until float32 rounding shows)
    write_adapter(reference_dir, folder, 8, 16, ALL, seed=3, scale=0.05, lora_dropout=0.0)
    return folder


def test_lora_on_kept_quantized_gguf_matches_peft(reference_dir, adapter):
    from conftest import worker_of

    llm = LLM(model=str(default_model_path()), dtype="float32", skip_tokenizer_init=True,
              kv_cache_memory_bytes=64 << 20, enable_lora=True, max_loras=1, max_lora_rank=8)
    wrapped = [m for m in worker_of(llm).model.modules() if isinstance(m, LoRALinear)]
    assert wrapped and all(isinstance(m.base, GGUFLinear) for m in wrapped)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            detokenize=False, logprobs=2)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in PROMPTS]
    with_adapter = llm.generate(prompts, params, use_tqdm=False,
                                lora_request=lora("gguf-lora", 1, adapter))
    base = llm.generate(prompts, params, use_tqdm=False)
    reference = peft_reference(reference_dir, adapter)
    for prompt, output, plain in zip(PROMPTS, with_adapter, base):
        completion = output.outputs[0]
        assert completion.token_ids == transformers_greedy(reference, prompt, MAX_TOKENS)
        assert_logprobs_match(reference, prompt, completion)
        assert completion.token_ids != plain.outputs[0].token_ids  # the adapter matters
