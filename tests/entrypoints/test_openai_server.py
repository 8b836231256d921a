"""End-to-end tests of `pagedllm serve`: one real server process for the module, driven by the
official openai client (sync and async) and by raw HTTP, checked against the offline engine."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from pagedllm import SamplingParams

from .server_utils import (
    DEAD_ENGINE_EXIT_S,
    ServerProcess,
    engine_state,
    health_after_death,
    launch_server,
    sse_events_iter,
    stream_until_killed,
)

API_KEY = "sk-test-key"
MODEL = "smol"
OTHER_NAME = "smol-alias"
MAX_MODEL_LEN = 512
SHUTDOWN_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    server = launch_server(
        tmp_path_factory.mktemp("serve"), "--served-model-name", MODEL, OTHER_NAME,
        "--kv-cache-memory", "512MiB", "--max-model-len", str(MAX_MODEL_LEN),
        "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S), "--disable-access-log", api_key=API_KEY)
    try:
        request.getfixturevalue("offline_llm")  # load the reference while the server starts
        server.wait_until_healthy()
        yield server
        check_sigterm_ends_inflight_stream_and_exits_zero(server)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server: ServerProcess):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as session:
        yield session


def async_client(server: ServerProcess) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def greedy(max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **extra)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> str:
    """The status and OpenAI's error shape; returns the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("authentication_error" if status == 401 else "invalid_request_error")
    if param is not None:
        assert error["param"] == param, error
    return error["message"]


def sse_events(response: httpx.Response) -> list[str]:
    return list(sse_events_iter(response))



def scrape(http: httpx.Client) -> dict[str, float]:
    """Every sample on /metrics, keyed like `name{label="value"}`."""
    response = http.get("/metrics")
    assert response.status_code == 200
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values


def wait_until_idle(http: httpx.Client, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = engine_state(http, since=10**9)
        idle = state["num_running"] == 0 and state["num_waiting"] == 0
        if idle or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


# ---- the same greedy text everywhere ------------------------------------------------------------
def test_completions_match_offline_streamed_and_async(server, client, offline_llm):
    prompt = "The capital of France is"
    request = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    full = client.completions.create(**request)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**request, stream=True))

    async def with_async_client() -> tuple[str, str]:
        async with async_client(server) as aclient:
            whole = await aclient.completions.create(**request)
            stream = await aclient.completions.create(**request, stream=True)
            return whole.choices[0].text, "".join([c.choices[0].text async for c in stream])

    async_full, async_streamed = asyncio.run(with_async_client())
    offline = offline_llm.generate([prompt], greedy(12), use_tqdm=False)[0]
    expected = offline.outputs[0]
    assert expected.text.strip()
    assert full.choices[0].text == streamed == async_full == async_streamed == expected.text
    assert full.choices[0].finish_reason == expected.finish_reason
    assert full.model == MODEL and full.object == "text_completion"
    assert full.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert full.usage.completion_tokens == len(expected.token_ids)
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens


def test_chat_matches_offline_streamed_and_async(server, client, offline_llm):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the capital of France?"}]
    request = dict(model=OTHER_NAME, messages=messages, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)

    async def with_async_client() -> tuple[str, str]:
        async with async_client(server) as aclient:
            whole = await aclient.chat.completions.create(**request)
            stream = await aclient.chat.completions.create(**request, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
            return whole.choices[0].message.content, text

    async_full, async_streamed = asyncio.run(with_async_client())
    offline = offline_llm.chat(messages, greedy(12), use_tqdm=False)[0]
    expected = offline.outputs[0]
    assert expected.text.strip()
    assert full.choices[0].message.content == streamed == async_full == async_streamed
    assert streamed == expected.text
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason == chunks[-1].choices[0].finish_reason
    assert full.choices[0].finish_reason == expected.finish_reason
    assert full.model == OTHER_NAME
    assert full.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert full.usage.completion_tokens == len(expected.token_ids)


def test_chat_stream_sends_role_then_content_then_finish_then_usage_then_done(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Name a color."}, {"type": "text", "text": "One word."}]}],
        "max_completion_tokens": 6, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *content, finish, usage = chunks[1:]
    assert content and all(c["choices"][0]["delta"].get("content") for c in content)
    assert all("finish_reason" not in c["choices"][0] for c in content)
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    tokenized = http.post("/tokenize", json={"messages": body["messages"]}).json()
    assert usage["usage"]["prompt_tokens"] == tokenized["count"]


# ---- completions options ------------------------------------------------------------------------
def test_completion_prompt_forms_echo_and_usage(client, http):
    prompt = "Hello, my name is"
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    by_text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)

    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == prompt + by_text.choices[0].text
    echoed_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6,
                                           temperature=0, echo=True)
    decoded = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert echoed_ids.choices[0].text == decoded + by_text.choices[0].text

    batch = dict(model=MODEL, prompt=[ids, ids[:3]], max_tokens=4, temperature=0,
                 extra_body={"ignore_eos": True})
    whole = client.completions.create(**batch)
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.usage.prompt_tokens == len(ids) + 3
    assert whole.usage.completion_tokens == 8
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(**batch, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == {0: whole.choices[0].text, 1: whole.choices[1].text}

    texts = client.completions.create(model=MODEL, prompt=["One", "Two", "Three"], max_tokens=2,
                                      extra_body={"ignore_eos": True, "top_k": 5, "min_p": 0.05},
                                      seed=7, temperature=0.8, top_p=0.9, user="tester")
    assert len(texts.choices) == 3 and texts.usage.completion_tokens == 6


def test_completion_logprobs_streamed_and_whole(client):
    request = dict(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0, logprobs=3,
                   extra_body={"ignore_eos": True})
    whole = client.completions.create(**request)
    logprobs = whole.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    assert len(logprobs.top_logprobs) == len(logprobs.text_offset) == 5
    offset = 0
    for token, chosen, top, start in zip(logprobs.tokens, logprobs.token_logprobs,
                                         logprobs.top_logprobs, logprobs.text_offset):
        assert chosen <= 0 and 3 <= len(top) <= 4
        assert top[token] == chosen == max(top.values())  # greedy picks the most likely token
        assert start == offset
        offset += len(token)
    assert "".join(logprobs.tokens) == whole.choices[0].text

    tokens, values = [], []
    for chunk in client.completions.create(**request, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            values += chunk.choices[0].logprobs.token_logprobs
    assert tokens == logprobs.tokens
    assert values == pytest.approx(logprobs.token_logprobs)


def test_sampling_extras_reach_the_engine(client, http):
    prompt = "The capital of France is"
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                      logprobs=0)
    token_text = first.choices[0].logprobs.tokens[0]
    token_ids = http.post("/tokenize", json={"prompt": token_text,
                                             "add_special_tokens": False}).json()["tokens"]
    assert len(token_ids) == 1
    stopped = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                        extra_body={"stop_token_ids": token_ids})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra["stop_reason"] == token_ids[0]
    assert stopped.usage.completion_tokens == 1
    held = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                     extra_body={"stop_token_ids": token_ids, "min_tokens": 3})
    assert held.usage.completion_tokens >= 3
    assert not held.choices[0].text.startswith(token_text)

    sampled = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0,
                   extra_body={"ignore_eos": True})
    seeded = [client.completions.create(**sampled, seed=1234).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]
    top_1 = client.completions.create(**{**sampled, "extra_body": {"top_k": 1, "ignore_eos": True}})
    greedy_text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                            temperature=0, extra_body={"ignore_eos": True})
    assert top_1.choices[0].text == greedy_text.choices[0].text


def test_n_choices_in_completions_and_chat(client, http):
    sampled = dict(model=MODEL, max_tokens=3, temperature=0.9, seed=11,
                   extra_body={"ignore_eos": True})
    whole = client.completions.create(prompt=["Hi", "Once upon"], n=2, **sampled)
    prompt_tokens = sum(http.post("/tokenize", json={"prompt": p}).json()["count"]
                        for p in ("Hi", "Once upon"))
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]  # prompt i, choice j -> i*n + j
    assert all(c.finish_reason == "length" and c.text for c in whole.choices)
    assert whole.usage.prompt_tokens == prompt_tokens  # each prompt counted once, not n times
    assert whole.usage.completion_tokens == 4 * 3

    chunks = list(client.chat.completions.create(
        messages=[{"role": "user", "content": "Hi"}], n=3, stream=True,
        stream_options={"include_usage": True}, **sampled))
    assert [c.index for c in chunks[0].choices] == [0, 1, 2]
    assert all(c.delta.role == "assistant" for c in chunks[0].choices)
    finished = sorted(c.choices[0].index for c in chunks[1:-1] if c.choices[0].finish_reason)
    assert finished == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == 3 * 3
    best = client.completions.create(prompt="Hi", n=1, best_of=3, **sampled)
    assert len(best.choices) == 1 and best.choices[0].text


def test_beam_search_matches_offline(client, offline_llm):
    from pagedllm import BeamSearchParams

    prompts = ["The capital of France is", "My favourite book is"]
    response = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6,
                                         extra_body={"use_beam_search": True,
                                                     "length_penalty": 0.8})
    offline = offline_llm.beam_search(prompts, BeamSearchParams(beam_width=2, max_tokens=6,
                                                                length_penalty=0.8))
    expected = [seq.text for output in offline for seq in output.sequences]
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert [c.text for c in response.choices] == expected
    all_tokens = sum(len(seq.tokens) for output in offline for seq in output.sequences)
    # two beams per prompt, each prompt's tokens counted once in usage
    assert response.usage.completion_tokens == all_tokens - 2 * response.usage.prompt_tokens


def test_logit_bias_and_penalties_reach_the_engine(client, http):
    the = http.post("/tokenize", json={"prompt": " the", "add_special_tokens": False}).json()
    assert len(the["tokens"]) == 1
    forced = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                       logit_bias={str(the["tokens"][0]): 100},
                                       extra_body={"ignore_eos": True})
    assert forced.choices[0].text == " the" * 4

    prompt = "one one one one one one one"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    penalized = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                          temperature=0, frequency_penalty=2.0,
                                          presence_penalty=2.0,
                                          extra_body={"repetition_penalty": 1.5})
    assert penalized.usage.completion_tokens == 8
    assert penalized.choices[0].text != plain.choices[0].text


def test_echo_with_logprobs_lists_the_prompt_tokens_first(client, http):
    prompt = "The sky is blue and"
    prompt_ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3,
                                         temperature=0, echo=True, logprobs=2,
                                         extra_body={"ignore_eos": True})
    choice = response.choices[0]
    logprobs = choice.logprobs
    assert choice.text.startswith(prompt)
    assert len(logprobs.tokens) == len(prompt_ids) + 3
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(v <= 0 for v in logprobs.token_logprobs[1:])
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset[len(prompt_ids)] == len(prompt)


def test_cache_salt_keeps_prefix_cache_hits_apart(http):
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    key = "pagedllm:prefix_cache_hits_total"

    def hits_after(salt: str) -> float:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "cache_salt": salt}
        assert http.post("/v1/completions", json=body).status_code == 200
        return scrape(http)[key]

    first = hits_after("tenant-a")
    again = hits_after("tenant-a")
    other = hits_after("tenant-b")
    assert again - first >= 16  # at least one full block of the prompt was found
    assert other == again  # another salt finds nothing of tenant-a's


def test_chat_logprobs(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == entry.logprob >= entry.top_logprobs[1].logprob
        assert entry.bytes == list(entry.token.encode())
    assert "".join(e.token for e in content) == response.choices[0].message.content


def test_stop_string_trims_text_in_stream_and_whole(client):
    prompt = "The capital of France is"
    base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    text = base.choices[0].text
    stop = next(w for w in text.split()[1:] if len(w) >= 2 and text.find(w) > 0)
    request = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    whole = client.completions.create(**request)
    chunks = list(client.completions.create(**request, stream=True))
    assert whole.choices[0].text == text[: text.find(stop)]
    assert whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].model_extra["stop_reason"] == stop
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


# ---- batching, disconnects, metrics -------------------------------------------------------------
def test_32_concurrent_streaming_chats_share_batches(server, http):
    first_step = engine_state(http)["num_steps"]

    async def one(aclient: AsyncOpenAI, i: int) -> tuple[str, str, str | None, int]:
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count from {i} to {i + 5}."}],
            max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        request_id, text, finish, tokens = "", "", None, 0
        async for chunk in stream:
            request_id = chunk.id
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return request_id, text, finish, tokens

    async def run_all():
        async with async_client(server) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(32)))

    results = asyncio.run(run_all())
    assert len({r[0] for r in results}) == 32
    assert all(text.strip() and finish == "length" and tokens == 8
               for _, text, finish, tokens in results)
    # The engine's step records name the requests each step ran: they must have shared steps.
    ours = {r[0] for r in results}
    steps = [set(step["scheduled"]) & ours for step in engine_state(http, first_step)["steps"]]
    assert max(len(s) for s in steps) >= 16, [len(s) for s in steps]
    assert all(any(rid in s and len(s) > 1 for s in steps) for rid in ours)
    decode_steps = sum(1 for s in steps if s)
    assert decode_steps < 32 * 8 / 4  # far fewer steps than running them one by one would take


def test_client_disconnect_aborts_request_and_frees_blocks(server, http):
    before = scrape(http)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        for count, _ in enumerate(e for e in response.iter_lines() if e.startswith("data:")):
            if count == 2:
                break  # leaving the block closes the connection mid-stream
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        http.post("/v1/completions", json=body, timeout=1.5)

    state = wait_until_idle(http, timeout=10)
    assert state["num_running"] == 0 and state["num_waiting"] == 0
    assert state["num_free_blocks"] == state["num_blocks"]
    after = scrape(http)
    key = 'pagedllm:request_success_total{finished_reason="abort"}'
    assert after[key] - before.get(key, 0) == 2
    generated = after["pagedllm:generation_tokens_total"] - before["pagedllm:generation_tokens_total"]
    assert 0 < generated < 2 * 400  # they stopped early: the engine did not run them to the end
    assert after["pagedllm:kv_cache_free_blocks"] == after["pagedllm:kv_cache_total_blocks"]
    assert after["pagedllm:kv_cache_usage_perc"] == 0


def test_metrics_parse_and_move(http):
    before = scrape(http)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert "pagedllm:" + name in before
    prompt = "Counting: one, two,"
    prompt_len = http.post("/tokenize", json={"prompt": prompt}).json()["count"]
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt,
                                                  "max_tokens": 5, "ignore_eos": True})
    assert response.status_code == 200
    after = scrape(http)

    def moved(key: str) -> float:
        return after[key] - before.get(key, 0.0)

    assert moved("pagedllm:prompt_tokens_total") == prompt_len
    assert moved("pagedllm:generation_tokens_total") == 5
    assert moved('pagedllm:request_success_total{finished_reason="length"}') == 1
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds",
                      "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert moved(f"pagedllm:{histogram}_count") == 1
        assert moved(f"pagedllm:{histogram}_sum") >= 0
    assert after["pagedllm:time_to_first_token_seconds_sum"] <= \
        after["pagedllm:e2e_request_latency_seconds_sum"]
    assert moved("pagedllm:engine_steps_total") >= 5
    assert 0 <= after["pagedllm:kv_cache_usage_perc"] <= 1


# ---- small routes, auth, errors -----------------------------------------------------------------
def test_models_health_version_tokenize(server, http):
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL, OTHER_NAME]
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert httpx.get(server.url + "/health").status_code == 200  # open without a key
    assert httpx.get(server.url + "/version").status_code == 401  # every other route needs it
    assert http.get("/version").json()["version"]
    tokens = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True,
                                          "model": MODEL}).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"]) > 0
    assert tokens["max_model_len"] == MAX_MODEL_LEN
    text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "Hello world"


def test_api_key_is_required_on_v1(server, client):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                    {"Authorization": f"Basic {API_KEY}"}):
        assert_openai_error(httpx.get(server.url + "/v1/models", headers=headers), 401)
        assert_openai_error(httpx.post(server.url + "/v1/completions", json=body,
                                       headers=headers), 401)
    wrong = OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert [m.id for m in client.models.list()] == [MODEL, OTHER_NAME]
    good = httpx.post(server.url + "/v1/completions", json=body, headers=server.headers)
    assert good.status_code == 200


LONG_PROMPT = [1] * (MAX_MODEL_LEN + 10)
CHAT = [{"role": "user", "content": "Hi"}]
ERROR_CASES = [
    # (route, body, status, param)
    ("/v1/completions", {"prompt": "x", "model": "no-such-model"}, 404, "model"),
    ("/v1/chat/completions", {"messages": CHAT, "model": "no-such-model"}, 404, "model"),
    ("/v1/completions", {"prompt": LONG_PROMPT}, 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1000}, 400, None),
    ("/v1/completions", {"prompt": LONG_PROMPT, "stream": True}, 400, None),  # before streaming
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 1000}, 400, None),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 1000, "stream": True}, 400, None),
    ("/v1/completions", {"prompt": "x", "n": 2, "temperature": 0}, 400, None),  # needs sampling
    ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2, "temperature": 1}, 400, None),
    ("/v1/completions", {"prompt": "x", "n": 65}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, None),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, None),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 200}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"the": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": []}, 400, None),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [-3]}, 400, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "x", "priority": "high"}, 400, "priority"),
    ("/v1/completions", {"prompt": "x", "use_beam_search": True, "stream": True}, 400, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "use_beam_search": True}, 400, "use_beam_search"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, None),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, None),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "xml"}}, 400,
     "response_format.type"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400,
     "tools.0.function"),  # a tool without its function
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400,
     "messages.0.content"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), ERROR_CASES,
                         ids=[f"{c[0]}:{','.join(c[1]) or 'empty'}" for c in ERROR_CASES])
def test_error_cases(http, route, body, status, param):
    message = assert_openai_error(http.post(route, json=body), status, param)
    if body.get("prompt") is LONG_PROMPT:
        assert str(len(LONG_PROMPT)) in message and str(MAX_MODEL_LEN) in message
    if 1000 in (body.get("max_tokens"), body.get("max_completion_tokens")):
        assert "1000" in message and str(MAX_MODEL_LEN) in message


def test_malformed_requests_and_unknown_routes(server, http):
    raw = {"headers": {**server.headers, "Content-Type": "application/json"}}
    bad_json = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "x",', **raw)
    assert "JSON" in assert_openai_error(bad_json, 400)
    not_object = httpx.post(server.url + "/v1/chat/completions", content=b"[1, 2]", **raw)
    assert_openai_error(not_object, 400)
    assert_openai_error(http.post("/v1/completions", content=b"prompt=x"), 400)
    assert_openai_error(http.post("/v1/images/generations", json={"prompt": "x"}), 404)
    assert_openai_error(http.get("/no/such/route"), 404)
    assert_openai_error(http.get("/v1/completions"), 405)
    # None of that hurt the server.
    assert http.get("/health").status_code == 200
    ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


# ---- shutdown (run by the server fixture's teardown) --------------------------------------------
def check_sigterm_ends_inflight_stream_and_exits_zero(server: ServerProcess) -> None:
    """SIGTERM while a long stream runs: the stream still ends properly (a finish chunk, then
    [DONE]) once the --shutdown-timeout has passed, and the process exits with status 0."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
            "stream": True, "ignore_eos": True}
    events = []
    started = time.monotonic()
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers,
                      timeout=60) as response:
        for event in sse_events_iter(response):
            events.append(event)
            if len(events) == 2:
                server.proc.send_signal(signal.SIGTERM)
    assert events[-1] == "[DONE]", events[-3:]
    finish = json.loads(events[-2])["choices"][0]["finish_reason"]
    assert finish == "abort"  # 400 tokens take far longer than the 2 s drain allows
    assert time.monotonic() - started < 30
    assert server.stop(signal.SIGTERM, timeout=60) == 0, server.log_tail()


# ---- the engine dies: the server exits non-zero so that a supervisor restarts it ----------------


@pytest.mark.parametrize(("flags", "victim"), [
    (("--engine-core-process",), "engine_core_pid"),
    (("--distributed-executor-backend", "mp"), "worker_pids"),
    (("--no-engine-core-process", "--distributed-executor-backend", "mp"), "worker_pids"),
], ids=["core-process", "worker-of-core-process", "worker-of-server"])
def test_server_exits_non_zero_when_its_engine_process_dies(tmp_path, flags, victim):
    """SIGKILL the engine core's process, or the worker's, during a stream: the stream ends
    with an error event and [DONE], /health stops answering 200, and the server exits with a
    non-zero status (so a supervisor restarts it) instead of hanging."""
    server = launch_server(tmp_path, *flags, "--kv-cache-memory", "256MiB",
                           "--max-model-len", str(MAX_MODEL_LEN), "--disable-access-log")
    try:
        server.wait_until_healthy()
        with httpx.Client(base_url=server.url, timeout=60) as http:
            pid = engine_state(http)[victim]
            pid = pid[0] if isinstance(pid, list) else pid
            assert pid not in (None, server.proc.pid)
            events = stream_until_killed(server, pid)
        assert events[-1] == "[DONE]", events[-3:]
        assert json.loads(events[-2])["error"]["code"] == "engine_error", events[-3:]
        assert health_after_death(server) in (503, None)
        assert server.proc.wait(DEAD_ENGINE_EXIT_S) != 0, server.log_tail()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
