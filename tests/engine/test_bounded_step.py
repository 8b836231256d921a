"""No single request may slow the step loop for everyone (issue 16, item 3).

For each option whose cost grows with what a client sends, at the server's default cap
(entrypoints/openai/limits.py), a normal batch runs twice: once beside a plain request, once
beside the same request with the costly option. The ratio of the two runs' step time (the
whole engine step: schedule, forward, sampling, detokenizing, stop strings) must stay near 1.
A ratio, not a time: the machine's speed drops out. Runs alternate and the best ratio of a few
rounds counts, so that one noisy moment on a shared machine does not fail the test.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
from conftest import make_llm

from pagedllm import SamplingParams
from pagedllm.entrypoints.openai.limits import RequestLimits

LIMITS = RequestLimits()
BATCH_PROMPTS = ["The capital of France is", "Hello, my name is", "One, two, three,",
                 "The best way to cook rice is"]
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 100  # ~1,000 tokens
NEW_TOKENS = 12
ROUNDS = 2
MAX_RATIO = 1.5
_salts = itertools.count()

COSTLY: dict[str, tuple[str, dict[str, Any]]] = {
    # case: (its prompt, the option at its cap)
    "bad_words": ("Tell me a story.", {"bad_words": [f"word{i}" for i in range(
        LIMITS.max_bad_words)]}),
    "logit_bias": ("Tell me a story.", {"logit_bias": {i: 0.5 for i in range(
        LIMITS.max_logit_bias)}}),
    "allowed_token_ids": ("Tell me a story.", {"allowed_token_ids": list(range(
        LIMITS.max_allowed_token_ids))}),
    "stop strings": ("Tell me a story.", {"stop": [f"{i}" + "~" * (LIMITS.max_stop_chars - 3)
                                                   for i in range(LIMITS.max_stop)]}),
    "stop_token_ids": ("Tell me a story.", {"stop_token_ids": list(range(
        1000, 1000 + LIMITS.max_stop_token_ids))}),
    "logprobs 20": ("Tell me a story.", {"logprobs": 20}),
    "prompt logprobs on a long prompt": (LONG_PROMPT, {"prompt_logprobs": 20}),
}


@pytest.fixture(scope="module")
def engine():
    engine = make_llm().llm_engine
    run_batch(engine, LONG_PROMPT, {})  # first-use costs (kernels for new shapes) go here
    return engine


def run_batch(engine, extra_prompt: str, extra: dict[str, Any]) -> float:
    """Seconds of engine steps to finish the batch plus one more request; a fresh cache salt
    each run, so that neither run reuses the other's prefix cache."""
    salt = f"run-{next(_salts)}"
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, prompt in enumerate(BATCH_PROMPTS):
        engine.add_request(f"{salt}-{i}", {"prompt": prompt, "cache_salt": salt}, params)
    costly = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, **extra)
    engine.add_request(f"{salt}-x", {"prompt": extra_prompt, "cache_salt": salt}, costly)
    spent = 0.0
    while engine.has_unfinished_requests():
        started = time.perf_counter()
        engine.step()
        spent += time.perf_counter() - started
    return spent


def step_time_ratio(engine, prompt: str, option: dict[str, Any]) -> float:
    ratios = []
    for _ in range(ROUNDS):
        plain = run_batch(engine, prompt, {})
        costly = run_batch(engine, prompt, option)
        ratios.append(costly / plain)
    return min(ratios)


@pytest.mark.parametrize("case", list(COSTLY))
def test_a_costly_request_at_its_cap_does_not_slow_the_step(engine, case):
    prompt, option = COSTLY[case]
    ratio = step_time_ratio(engine, prompt, option)
    print(f"{case}: step time x{ratio:.2f} with the costly request")
    assert ratio < MAX_RATIO, f"{case}: the batch's steps took x{ratio:.2f} as long"
