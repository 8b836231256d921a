"""n and best_of: siblings forked from one prefilled prompt share its blocks, copy on write."""

from __future__ import annotations

import math

from pagedllm import RequestOutputKind, SamplingParams


def test_n_returns_indexed_distinct_samples(llm):
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=11)
    (out,) = llm.generate("My three favourite foods are", params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    (again,) = llm.generate("My three favourite foods are", params, use_tqdm=False)
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_forked_children_read_the_shared_prompt_correctly(llm):
    prompt = "In the beginning the universe was created. This"  # ends inside a block
    ids = llm.get_tokenizer().encode(prompt)
    assert len(ids) % llm.llm_engine.cache_config.block_size != 0
    manager = llm.llm_engine.engine_core.kv_cache_manager
    copies = manager.num_cow_copies
    params = SamplingParams(n=4, temperature=0.8, max_tokens=16, seed=100, ignore_eos=True)
    (shared,) = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
    assert manager.num_cow_copies >= copies + 3  # each writer but the last copies the block
    for i, completion in enumerate(shared.outputs):
        alone = SamplingParams(temperature=0.8, max_tokens=16, seed=100 + i, ignore_eos=True)
        (unshared,) = llm.generate({"prompt_token_ids": ids}, alone, use_tqdm=False)
        assert completion.token_ids == unshared.outputs[0].token_ids, i


def test_prompt_blocks_are_shared_not_copied(llm):
    engine = llm.llm_engine
    bs = engine.cache_config.block_size
    prompt = " ".join(f"item{i}" for i in range(230))  # ~500 tokens, seen by no other test
    ids = llm.get_tokenizer().encode(prompt)
    prompt_blocks, output_blocks = math.ceil(len(ids) / bs), math.ceil(40 / bs)
    before = engine.engine_core.block_pool.num_allocations
    params = SamplingParams(n=8, temperature=1.0, max_tokens=40, ignore_eos=True)
    (out,) = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
    used = engine.engine_core.block_pool.num_allocations - before
    assert len(out.outputs) == 8
    # the prompt once, each sibling its own output blocks (+1 for its copied partial block)
    assert used <= prompt_blocks + 8 * (output_blocks + 1)
    assert used < 2 * prompt_blocks < 8 * prompt_blocks


def test_best_of_returns_the_n_most_likely(llm):
    params = SamplingParams(n=2, best_of=5, temperature=1.0, max_tokens=10, seed=3)
    (out,) = llm.generate("The weather today is", params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1]
    scores = [c.cumulative_logprob for c in out.outputs]
    assert scores == sorted(scores, reverse=True)
    assert out.outputs[0].logprobs is None  # not asked for, only used for ranking
    all_five = SamplingParams(n=5, temperature=1.0, max_tokens=10, seed=3, logprobs=0)
    (every,) = llm.generate("The weather today is", all_five, use_tqdm=False)
    best_two = sorted((c.cumulative_logprob for c in every.outputs), reverse=True)[:2]
    assert [round(s, 4) for s in scores] == [round(s, 4) for s in best_two]


def test_streamed_deltas_carry_their_index(llm):
    engine = llm.llm_engine
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=5,
                            output_kind=RequestOutputKind.DELTA)
    engine.add_request("stream-n", "Once upon a time", params)
    texts = {0: [], 1: [], 2: []}
    while engine.has_unfinished_requests():
        for output in engine.step():
            for completion in output.outputs:
                texts[completion.index].append(completion.token_ids)
    final = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=5)
    (expected,) = llm.generate("Once upon a time", final, use_tqdm=False)
    for completion in expected.outputs:
        assert sum(texts[completion.index], []) == completion.token_ids


def test_abort_frees_every_sibling(llm):
    engine = llm.llm_engine
    engine.add_request("to-abort", "Count to one hundred:", SamplingParams(
        n=4, temperature=1.0, max_tokens=50))
    for _ in range(3):
        engine.step()
    assert engine.get_num_unfinished_requests() == 4
    engine.abort_request("to-abort")
    assert not engine.has_unfinished_requests()
