"""Continuous batching seen from the engine's step records."""

from __future__ import annotations

from conftest import make_llm

from pagedllm import SamplingParams


def test_requests_join_while_others_run():
    llm = make_llm(max_num_seqs=4)
    engine = llm.llm_engine
    first_step = engine.num_steps
    lengths = [60, 3, 3, 3, 3, 50, 3, 3, 3, 3, 40, 3]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    prompts = [f"Request number {i} says" for i in range(len(lengths))]
    outputs = llm.generate(prompts, params, use_tqdm=False)

    assert [len(o.outputs[0].token_ids) for o in outputs] == lengths
    records = [r for r in engine.step_records if r.step > first_step]
    assert len(records) < sum(lengths) / 2, "steps must be shared between requests"
    # a request admitted (its prompt prefilled) in a step where another request was decoding
    joined = [r for r in records if r.num_prefill_tokens and r.num_decode_tokens]
    assert joined
    assert max(len(r.scheduled) for r in records) == 4  # max_num_seqs is honoured
    # requests that finished early were replaced: more than 4 distinct ids ran in the window
    # in which the 60-token request was running
    long_steps = [r for r in records if "0" in {k.split("-")[-1] for k in r.scheduled}]
    assert len({rid for r in long_steps for rid in r.scheduled}) > 4
