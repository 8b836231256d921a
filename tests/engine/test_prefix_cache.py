"""Automatic prefix caching end to end: shared system prompts are computed once."""

from __future__ import annotations

from conftest import make_llm

from pagedllm import SamplingParams

SYSTEM = ("You are a meticulous assistant. " * 67).strip()  # ~400 tokens
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def computed_tokens(engine, request_id: str) -> int:
    return sum(r.scheduled.get(request_id, 0) for r in engine.step_records)


def test_second_request_computes_only_its_suffix(llm):
    engine = llm.llm_engine
    tokenizer = llm.get_tokenizer()
    system_ids = tokenizer.encode(SYSTEM)
    assert 380 <= len(system_ids) <= 450
    first_ids = system_ids + tokenizer.encode(" Question one: what is 2+2?")
    second_ids = system_ids + tokenizer.encode(" Question two: name a colour.")
    llm.generate({"prompt_token_ids": first_ids}, GREEDY, use_tqdm=False)
    before = engine.num_steps
    (second,) = llm.generate({"prompt_token_ids": second_ids}, GREEDY, use_tqdm=False)
    bs = engine.cache_config.block_size
    assert second.num_cached_tokens == len(system_ids) // bs * bs
    record = next(r for r in engine.step_records if r.step == before + 1)
    (request_id,) = record.scheduled
    assert computed_tokens(engine, request_id) == (
        len(second_ids) - second.num_cached_tokens + len(second.outputs[0].token_ids) - 1)

    uncached = make_llm(enable_prefix_caching=False)
    (expected,) = uncached.generate({"prompt_token_ids": second_ids}, GREEDY, use_tqdm=False)
    assert expected.num_cached_tokens == 0
    assert second.outputs[0].token_ids == expected.outputs[0].token_ids


def test_cache_salt_isolates_tenants(llm):
    ids = llm.get_tokenizer().encode(SYSTEM + " Tell me a joke.")
    (a,) = llm.generate({"prompt_token_ids": ids, "cache_salt": "tenant-a"}, GREEDY,
                        use_tqdm=False)
    (b,) = llm.generate({"prompt_token_ids": ids, "cache_salt": "tenant-b"}, GREEDY,
                        use_tqdm=False)
    (a2,) = llm.generate({"prompt_token_ids": ids, "cache_salt": "tenant-a"}, GREEDY,
                         use_tqdm=False)
    assert a.num_cached_tokens == 0 or a.num_cached_tokens < len(ids) - 16  # fresh salt
    assert b.num_cached_tokens == 0
    assert a2.num_cached_tokens >= len(ids) - 16
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == a2.outputs[0].token_ids


def test_eviction_under_pressure_keeps_outputs_correct(llm):
    small = make_llm(kv_cache_memory_bytes=40 * 737280)  # 640 tokens: room for one prompt
    tokenizer = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tokenizer.encode(f"Variant {i}. {SYSTEM}")} for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    evictions = small.llm_engine.engine_core.block_pool.num_evictions
    for _ in range(2):
        got = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
        assert got == expected
    assert small.llm_engine.engine_core.block_pool.num_evictions > evictions
