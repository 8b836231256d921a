"""Whatever passes validation cannot fail inside the engine (issue 16, item 1), by hypothesis.

Two doors, each fed wide random values (huge and negative integers, inf and NaN, lone
surrogates, long lists): the OpenAI request models behind the real server app, and
SamplingParams with the offline engine. A request that is refused must be refused with a 4xx or
a ValueError; one that is accepted must run its first steps without an exception and without a
sequence ending in "error", and leave every KV block free once it ends.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import make_llm
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pagedllm import SamplingParams
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai.api_server import build_app
from pagedllm.entrypoints.openai.cli_args import ServerOptions
from pagedllm.entrypoints.openai.limits import RequestLimits

MODEL = "smol"
STEPS = 4  # steps an accepted offline request runs before it is aborted
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])

# Every character, lone surrogates included (hypothesis leaves those out by default).
any_text = st.text(st.characters(codec=None, categories=None), max_size=12)
# The edges of what the engine's tensors and generators hold, and of floating point.
INT_EDGES = [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, -1, 0, 2**31]
FLOAT_EDGES = [float("inf"), float("-inf"), float("nan"), 1e308, -1e308, 1e-300, 0.0, -0.0]
any_int = st.one_of(st.sampled_from(INT_EDGES), st.integers())
any_float = st.one_of(st.sampled_from(FLOAT_EDGES),
                      st.floats(allow_nan=True, allow_infinity=True))
small_lists = {"max_size": 6}
token_ids = st.lists(st.one_of(st.integers(0, 49_151), st.integers(0, 49_151),
                               st.integers()), **small_lists)
# Few tokens, or far more than the context, so an accepted request stays short.
max_tokens = st.one_of(st.none(), st.integers(-2, 6), st.integers(min_value=10**4))


def mostly(plausible: st.SearchStrategy, extreme: st.SearchStrategy) -> st.SearchStrategy:
    """Three draws in four from values a client would send, so that many requests get past
    validation and into the engine; the rest from anywhere."""
    return st.one_of(plausible, plausible, plausible, extreme)


def optional(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), strategy)


# Each field's values (never None: `optional` adds it where a field takes it).
NUMBERS: dict[str, st.SearchStrategy] = {
    "n": mostly(st.integers(1, 3), any_int),
    "best_of": mostly(st.integers(1, 4), any_int),
    "temperature": mostly(st.floats(0, 2), any_float),
    "top_p": mostly(st.floats(0.01, 1), any_float),
    "top_k": mostly(st.integers(-1, 60_000), any_int),
    "min_p": mostly(st.floats(0, 1), any_float),
    "seed": mostly(st.integers(-(2**63), 2**64 - 1), any_int),
    "presence_penalty": mostly(st.floats(-2, 2), any_float),
    "frequency_penalty": mostly(st.floats(-2, 2), any_float),
    "repetition_penalty": mostly(st.floats(0.01, 100), any_float),
    "min_tokens": st.integers(-2, 10),
    "logprobs": mostly(st.integers(0, 20), any_int),
}
LISTS: dict[str, st.SearchStrategy] = {
    "stop": st.one_of(any_text, st.lists(any_text, **small_lists)),
    "stop_token_ids": token_ids,
    "bad_words": st.lists(any_text, **small_lists),
    "allowed_token_ids": token_ids,
}
FLAGS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")
bias_values = mostly(st.floats(-100, 100), any_float)

sampling_fields: dict[str, st.SearchStrategy] = {
    **{name: optional(values) for name, values in {**NUMBERS, **LISTS}.items()},
    **{name: st.booleans() for name in FLAGS},
    "max_tokens": max_tokens,
    "logit_bias": optional(st.dictionaries(mostly(st.integers(0, 49_151).map(str), any_text),
                                           bias_values, max_size=4)),
    "cache_salt": optional(any_text), "priority": any_int,
    "presence_penalty": NUMBERS["presence_penalty"],  # null is not a penalty on the wire
    "frequency_penalty": NUMBERS["frequency_penalty"],
    "min_tokens": NUMBERS["min_tokens"],
}
completion_fields = {
    **sampling_fields,
    "prompt": mostly(st.text(min_size=1, max_size=12),
                     st.one_of(any_text, token_ids, st.lists(any_text, min_size=1, max_size=3))),
    "echo": st.booleans(), "stream": st.booleans(), "use_beam_search": st.booleans(),
    "length_penalty": mostly(st.floats(-10, 10), any_float),
}


@st.composite
def completion_bodies(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.sets(st.sampled_from(sorted(completion_fields)), max_size=4))
    body = {name: draw(completion_fields[name]) for name in sorted(names)}
    body.setdefault("prompt", draw(completion_fields["prompt"]))
    body.setdefault("max_tokens", draw(st.integers(1, 4)))
    return {"model": MODEL, **body}


@pytest.fixture(scope="module")
def engine_llm():
    return make_llm()


@pytest.fixture(scope="module")
def server(engine_llm):
    engine = AsyncLLM(engine_llm.llm_engine)
    limits = RequestLimits(max_n=4, max_tokens_default=4)  # keep accepted requests short
    with TestClient(build_app(engine, [MODEL], options=ServerOptions(limits=limits))) as client:
        yield client
    engine.shutdown()


def to_json(body: dict[str, Any]) -> bytes:
    """JSON as a client can send it: lone surrogates as \\ud800 escapes, inf as a bare word
    (Python's json reads those; the server must refuse them)."""
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


@SETTINGS
@given(body=completion_bodies())
def test_an_accepted_completion_request_never_fails_in_the_engine(server, body):
    response = server.post("/v1/completions", content=to_json(body),
                           headers={"Content-Type": "application/json"})
    assert response.status_code in (200, 400, 404, 413), response.text[:400]
    event(f"status {response.status_code}")
    if response.status_code != 200:
        assert response.json()["error"]["message"]
        return
    assert "engine_error" not in response.text, response.text[:400]
    if body.get("stream"):
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        return
    reasons = [choice["finish_reason"] for choice in response.json()["choices"]]
    assert reasons and all(r in ("stop", "length") for r in reasons), reasons


# SamplingParams' own types: None only where the field is optional (a None where a number
# belongs is a TypeError of the caller's own making, as anywhere in Python).
OPTIONAL = {"best_of", "seed", "logprobs", *LISTS}
offline_fields = {
    **{name: optional(values) if name in OPTIONAL else values
       for name, values in {**NUMBERS, **LISTS}.items()},
    **{name: st.booleans() for name in FLAGS},
    "max_tokens": max_tokens,
    "logit_bias": optional(st.dictionaries(mostly(st.integers(0, 49_151), any_int),
                                           bias_values, max_size=4)),
    "prompt_logprobs": optional(NUMBERS["logprobs"]),
}


@st.composite
def offline_requests(draw: st.DrawFn) -> tuple[Any, dict[str, Any], int]:
    names = draw(st.sets(st.sampled_from(sorted(offline_fields)), max_size=4))
    kwargs = {name: draw(offline_fields[name]) for name in sorted(names)}
    prompt = draw(st.one_of(mostly(st.text(min_size=1, max_size=12), any_text),
                            st.fixed_dictionaries(
        {"prompt_token_ids": token_ids}), st.fixed_dictionaries(
        {"prompt": any_text, "cache_salt": any_text})))
    return prompt, kwargs, draw(mostly(st.integers(-5, 5), any_int))


@SETTINGS
@given(request=offline_requests())
def test_accepted_sampling_params_never_fail_in_the_engine(engine_llm, request):
    prompt, kwargs, priority = request
    engine = engine_llm.llm_engine
    try:
        params = SamplingParams(**kwargs)
        engine.process_input("prop", prompt, params, priority=priority)  # the door's checks
    except ValueError:  # refused at the door, with a reason: fine
        event("refused")
        return
    event("accepted")
    reasons = run_briefly(engine, "prop", prompt, params)
    assert "error" not in reasons, (kwargs, reasons)
    pool = engine.engine_core.block_pool
    assert not engine.has_unfinished_requests()
    assert pool.num_free_blocks == pool.num_blocks


INT_FIELDS = ("n", "best_of", "top_k", "seed", "min_tokens", "logprobs", "prompt_logprobs",
              "max_tokens")
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty")


def edge_cases() -> list[dict[str, Any]]:
    """Every number field at every edge, and every token-id list holding each integer edge,
    on top of a sampled (not greedy) request so the sampler's whole path runs."""
    cases = [{name: edge} for name in INT_FIELDS for edge in INT_EDGES]
    cases += [{name: edge} for name in FLOAT_FIELDS for edge in FLOAT_EDGES]
    for edge in INT_EDGES:
        cases += [{"stop_token_ids": [edge]}, {"allowed_token_ids": [edge]},
                  {"logit_bias": {edge: 1.0}}]
    cases += [{"logit_bias": {1: edge}} for edge in FLOAT_EDGES]
    return cases


def run_briefly(engine, request_id: str, prompt: Any, params: SamplingParams) -> list[str]:
    """Add, step a few times, abort; the finish reasons seen (never 'error' if all is well)."""
    engine.add_request(request_id, prompt, params)
    reasons: list[str] = []
    try:
        for _ in range(STEPS):
            for output in engine.step():
                reasons += [c.finish_reason for c in output.outputs if c.finish_reason]
            if not engine.has_unfinished_requests():
                break
    finally:
        engine.abort_request(request_id)
    return reasons


def test_every_number_at_every_edge_is_refused_or_runs(engine_llm):
    """An exhaustive sweep next to the random search above: each edge is tried for sure."""
    engine = engine_llm.llm_engine
    failures, accepted = [], 0
    for i, edge in enumerate(edge_cases()):
        kwargs = {"temperature": 1.0, "max_tokens": 3, "seed": 0, **edge}
        try:
            params = SamplingParams(**kwargs)
            reasons = run_briefly(engine, f"edge-{i}", "Hello there", params)
        except ValueError:
            continue  # refused, with a reason
        except Exception as exc:  # anything else at the door is a bug too
            failures.append((edge, repr(exc)))
            continue
        accepted += 1
        if "error" in reasons:
            failures.append((edge, reasons))
    assert not failures, failures
    assert accepted >= 20  # the sweep reaches the engine, not only the checks
    pool = engine.engine_core.block_pool
    assert not engine.has_unfinished_requests() and pool.num_free_blocks == pool.num_blocks
