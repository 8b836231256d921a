"""Speculative decoding end to end on the default model: what a user gets is what the same
engine gives without speculation (greedy tokens, logprobs, stops), while drafts are accepted."""

from __future__ import annotations

import json

import pytest
from conftest import PROMPTS, make_llm
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from pagedllm import SamplingParams
from pagedllm.core.stats import SpecDecodingStats
from pagedllm.engine.beam_ranking import BeamSearchParams
from pagedllm.entrypoints.openai.metrics import spec_decode_counters
from pagedllm.sampling_params import StructuredOutputsParams

NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                    "prompt_lookup_min": 2})
PASSAGE = ("The old lighthouse keeper climbed the spiral stairs every evening, lit the great "
           "lamp, and watched the ships pass safely through the narrow channel below.")
# prompts whose answers copy from them (drafts get accepted), and the suite's usual ones
COPY_PROMPTS = [
    f"Repeat this passage word for word: {PASSAGE}\nRepeated: The old lighthouse keeper",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n   ",
    "one two three four five six seven one two three four five six seven one two three",
    f"Text: {PASSAGE[:60]}\nSame text again: The old",
    "A B C D E F G H A B C D E F G H A B C",
    "red, green, blue, red, green, blue, red,",
    f"Quote: {PASSAGE}\nQuote again: {PASSAGE[:40]}",
    "1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2,",
]
MIXED_16 = COPY_PROMPTS + PROMPTS


@pytest.fixture(scope="module")
def spec_llm():
    return make_llm(speculative_config=NGRAM)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_batch_of_16_mixed_lengths_is_identical(llm, spec_llm):
    params = SamplingParams(temperature=0, max_tokens=20)
    before = spec_llm.llm_engine.engine_core.stats().spec_decoding.copy()
    first_step = spec_llm.llm_engine.engine_core.num_steps
    assert token_ids(spec_llm.generate(MIXED_16, params, use_tqdm=False)) == \
        token_ids(llm.generate(MIXED_16, params, use_tqdm=False))
    after = spec_llm.llm_engine.engine_core.stats().spec_decoding
    assert after.num_accepted_tokens - before.num_accepted_tokens > 30  # it did speculate
    assert after.num_draft_tokens - before.num_draft_tokens > \
        after.num_accepted_tokens - before.num_accepted_tokens  # and some were rejected
    records = [r for r in spec_llm.llm_engine.step_records if r.step >= first_step]
    verifying = [r for r in records if r.spec_drafts_per_position]
    assert verifying and len(records) < 20 + 3  # fewer steps than one token each would take
    rates = [rate for r in verifying for rate in r.spec_acceptance_per_position]
    assert all(0.0 <= rate <= 1.0 for rate in rates) and max(rates) == 1.0


def test_one_request_alone_and_its_logprobs(llm, spec_llm):
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=3)
    (plain,) = llm.generate(COPY_PROMPTS[0], params, use_tqdm=False)
    (spec,) = spec_llm.generate(COPY_PROMPTS[0], params, use_tqdm=False)
    assert spec.outputs[0].token_ids == plain.outputs[0].token_ids
    assert spec.outputs[0].text == plain.outputs[0].text
    for mine, theirs in zip(spec.outputs[0].logprobs, plain.outputs[0].logprobs):
        assert mine.keys() == theirs.keys()
        for token_id in mine:
            assert mine[token_id].logprob == pytest.approx(theirs[token_id].logprob, abs=1e-4)
            assert mine[token_id].rank == theirs[token_id].rank


def test_stops_inside_an_accepted_run(llm, spec_llm):
    """Stop strings, a stop token and max_tokens that land inside a run of accepted drafts
    end the output where one-token steps would have, in one batch."""
    ships = spec_llm.get_tokenizer().encode(" ships", add_special_tokens=False)
    params = [SamplingParams(temperature=0, max_tokens=40, stop=["ships pass"]),
              SamplingParams(temperature=0, max_tokens=40, stop=["spiral"],
                             include_stop_str_in_output=True),
              SamplingParams(temperature=0, max_tokens=7),
              SamplingParams(temperature=0, max_tokens=40, stop_token_ids=ships[-1:])]
    prompts = [COPY_PROMPTS[0]] * len(params)
    plain = llm.generate(prompts, params, use_tqdm=False)
    spec = spec_llm.generate(prompts, params, use_tqdm=False)
    for mine, theirs in zip(spec, plain):
        mine, theirs = mine.outputs[0], theirs.outputs[0]
        assert (mine.token_ids, mine.text) == (theirs.token_ids, theirs.text)
        assert (mine.finish_reason, mine.stop_reason) == (theirs.finish_reason, theirs.stop_reason)
    assert [o.outputs[0].finish_reason for o in plain] == ["stop", "stop", "length", "stop"]


def test_requests_that_cannot_speculate_share_the_batch(llm, spec_llm):
    """Penalties, min_tokens and a grammar make a request decode one token per step; the
    others in the same steps still speculate, and every output is the plain engine's."""
    prompts = COPY_PROMPTS[:4]
    params = [SamplingParams(temperature=0, max_tokens=12),
              SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3),
              SamplingParams(temperature=0, max_tokens=12, min_tokens=8),
              SamplingParams(temperature=0, max_tokens=12,
                             structured_outputs=StructuredOutputsParams(regex="[a-z ]{5,20}"))]
    assert token_ids(spec_llm.generate(prompts, params, use_tqdm=False)) == \
        token_ids(llm.generate(prompts, params, use_tqdm=False))


def test_parallel_sampling_is_seeded_and_reproducible(spec_llm):
    params = SamplingParams(n=2, temperature=0.8, seed=11, max_tokens=10)
    first = spec_llm.generate(COPY_PROMPTS[2], params, use_tqdm=False)[0]
    again = spec_llm.generate(COPY_PROMPTS[2], params, use_tqdm=False)[0]
    assert len(first.outputs) == 2
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert all(len(c.token_ids) == 10 or c.finish_reason == "stop" for c in first.outputs)


def test_beam_search_is_refused_with_a_reason(spec_llm):
    with pytest.raises(ValueError, match="beam search is not supported with speculative"):
        spec_llm.beam_search(["Hello"], BeamSearchParams(beam_width=2, max_tokens=4))


def test_metrics_use_vllm_names():
    stats = SpecDecodingStats()
    stats.observe(4, 2)
    stats.observe(3, 3)

    class Fixed(Collector):
        def collect(self):
            return spec_decode_counters(stats)

    registry = CollectorRegistry()
    registry.register(Fixed())
    text = generate_latest(registry).decode()
    assert "pagedllm:spec_decode_num_drafts_total 2.0" in text
    assert "pagedllm:spec_decode_num_draft_tokens_total 7.0" in text
    assert "pagedllm:spec_decode_num_accepted_tokens_total 5.0" in text
    assert 'pagedllm:spec_decode_num_accepted_tokens_per_pos_total{position="2"} 1.0' in text
    assert stats.acceptance_per_position() == [1.0, 1.0, 0.5, 0.0]


@pytest.mark.slow
def test_greedy_identical_under_preemption_on_the_default_model():
    """A cache of 24 blocks for 16 prompts of 20 to 60 tokens: preemption and recompute, with
    the prefix cache on, each engine alike."""
    small = dict(kv_cache_memory_bytes=24 * 737_280, max_num_batched_tokens=128)
    plain, spec = make_llm(**small), make_llm(speculative_config=NGRAM, **small)
    params = SamplingParams(temperature=0, max_tokens=24)
    assert token_ids(spec.generate(MIXED_16, params, use_tqdm=False)) == \
        token_ids(plain.generate(MIXED_16, params, use_tqdm=False))
    assert any(r.preempted for r in spec.llm_engine.step_records)


@pytest.mark.slow
def test_the_default_model_as_its_own_draft_accepts_everything(llm):
    from pagedllm.model.source import default_model_path

    draft = json.dumps({"model": str(default_model_path()), "num_speculative_tokens": 3})
    spec = make_llm(speculative_config=draft)
    params = SamplingParams(temperature=0, max_tokens=24)
    assert token_ids(spec.generate(COPY_PROMPTS[:4], params, use_tqdm=False)) == \
        token_ids(llm.generate(COPY_PROMPTS[:4], params, use_tqdm=False))
    stats = spec.llm_engine.engine_core.stats().spec_decoding
    assert stats.num_draft_tokens > 30 and stats.num_accepted_tokens == stats.num_draft_tokens
