"""Greedy outputs equal transformers' token for token on the bundled model (float32)."""

from __future__ import annotations

import pytest
from conftest import PROMPTS, make_llm

from pagedllm import SamplingParams

GREEDY_64 = SamplingParams(temperature=0, max_tokens=64)


def test_greedy_batch_matches_transformers(llm, hf_greedy):
    outputs = llm.generate(PROMPTS, GREEDY_64, use_tqdm=False)
    lengths = {len(o.prompt_token_ids) for o in outputs}
    assert len(lengths) >= 6, "prompts of different lengths"
    for prompt, output in zip(PROMPTS, outputs):
        assert output.prompt == prompt
        assert output.outputs[0].token_ids == hf_greedy(prompt, 64), prompt


def test_greedy_one_at_a_time_matches_transformers(llm, hf_greedy):
    for prompt in PROMPTS:
        (output,) = llm.generate(prompt, GREEDY_64, use_tqdm=False)
        assert output.outputs[0].token_ids == hf_greedy(prompt, 64), prompt


def test_text_is_the_decoded_tokens(llm):
    outputs = llm.generate(PROMPTS, GREEDY_64, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    for output in outputs:
        completion = output.outputs[0]
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert output.finished
        assert completion.finish_reason in ("stop", "length")


def test_small_cache_preempts_and_still_matches(llm):
    # ~20 blocks of 16 tokens: far too few for eight requests of up to ~110 tokens at once.
    small = make_llm(kv_cache_memory_bytes=20 * 737280)
    assert small.llm_engine.cache_config.num_blocks == 20
    expected = llm.generate(PROMPTS, GREEDY_64, use_tqdm=False)
    got = small.generate(PROMPTS, GREEDY_64, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert small.llm_engine.engine_core.scheduler.num_preemptions > 0
    assert any(record.preempted for record in small.llm_engine.step_records)


def test_chunked_prompts_match_unchunked(llm):
    chunked = make_llm(max_num_batched_tokens=16)
    expected = llm.generate(PROMPTS, GREEDY_64, use_tqdm=False)
    got = chunked.generate(PROMPTS, GREEDY_64, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert max(r.num_prefill_tokens + r.num_decode_tokens
               for r in chunked.llm_engine.step_records) <= 16


@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_block_size_does_not_change_results(llm, block_size):
    other = make_llm(block_size=block_size)
    prompts = PROMPTS[:3]
    params = SamplingParams(temperature=0, max_tokens=24)
    expected = llm.generate(prompts, params, use_tqdm=False)
    got = other.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
