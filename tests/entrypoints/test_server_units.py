"""The server's parts that need no model: the shared stream/collect helpers of the handlers,
the watchdog that stops the server (with a non-zero exit status) when its engine dies, and the
guards in front of the engine (auth on every route, body size, strict types, request limits,
overload, health while stalled). A scripted fake stands in for AsyncLLM, so these run in well
under a second each."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from pagedllm.engine.async_llm import (
    EngineDeadError,
    EngineOverloadedError,
    EngineStats,
    EngineStepError,
    NewRequest,
)
from pagedllm.entrypoints.openai import api_server
from pagedllm.entrypoints.openai.api_server import DrainingServer, build_app
from pagedllm.entrypoints.openai.cli_args import ServerOptions
from pagedllm.entrypoints.openai.dashboard import PAGE_PATHS
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.limits import DEFAULT_MAX_TOKENS, RequestLimits, decimal_below
from pagedllm.entrypoints.openai.protocol import UsageInfo
from pagedllm.entrypoints.openai.serving_base import OpenAIServing, count_usage
from pagedllm.entrypoints.openai.serving_models import ServedModels
from pagedllm.outputs import CompletionOutput, RequestOutput

MODEL = "fake"
VOCAB_SIZE = 100
HANG = object()  # a scripted stream that reaches this waits forever


class ScriptedStream:
    """An OutputStream stand-in: yields `items` in order (raising those that are exceptions,
    waiting forever at HANG); records abort()."""

    def __init__(self, items: list) -> None:
        self.items = list(items)
        self.aborted = False

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if item is HANG:
            await asyncio.Event().wait()
        if isinstance(item, BaseException):
            raise item
        return item

    def abort(self) -> None:
        self.aborted = True


Script = Callable[[list[str]], list]  # the engine's request ids -> what their stream yields


class FakeEngine:
    """Just enough of AsyncLLM for build_app, the handlers and the watchdog: each batch of
    requests gets a stream of the next script's items."""

    def __init__(self, *scripts: Script) -> None:
        self.is_running = True
        self.tokenizer = None
        self.model_config = SimpleNamespace(source=SimpleNamespace(path=Path("/m/fake.gguf")),
                                            max_model_len=64, vocab_size=VOCAB_SIZE)
        self.scripts = list(scripts)
        self.streams: list[ScriptedStream] = []
        self.stalled_seconds = 0.0  # what stalled_for() reports
        self.stats = EngineStats()

    def stalled_for(self) -> float:
        return self.stalled_seconds

    async def run_input_work(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    def add_observer(self, observer) -> None:
        pass

    async def add_requests(self, requests: list[NewRequest]) -> ScriptedStream:
        stream = ScriptedStream(self.scripts.pop(0)([r.request_id for r in requests]))
        self.streams.append(stream)
        return stream

    def abort_all(self) -> None:
        pass


def output(request_id: str, *choices: tuple[int, str, str | None],
           prompt_len: int = 3) -> RequestOutput:
    """One delta output; each choice is (index, text, finish_reason) with one token per char."""
    completions = [CompletionOutput(index, text, list(range(len(text))), finish_reason=reason)
                   for index, text, reason in choices]
    finished = all(reason is not None for _, _, reason in choices)
    return RequestOutput(request_id, "p", list(range(prompt_len)), completions, finished)


def serving(engine: FakeEngine | None = None) -> OpenAIServing:
    return OpenAIServing(engine or FakeEngine(), ServedModels([MODEL], "/m", 64))


def events(body: str) -> list[str]:
    return [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]


async def drain(events_iter) -> list[str]:
    return [event async for event in events_iter]


# ---- usage, stream, collect ---------------------------------------------------------------------
def test_usage_counts_the_prompt_once_per_request_and_every_choice():
    usage = UsageInfo()
    count_usage(usage, output("a", (0, "ab", None), (1, "c", None)))  # unfinished: no prompt
    count_usage(usage, output("a", (0, "d", "stop"), (1, "ef", "length")))
    count_usage(usage, output("b", (0, "g", "stop"), prompt_len=5))
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (8, 7, 15)
    best = output("c", (0, "xyz", "stop"), (1, "uvwt", "stop"))
    count_usage(usage, best, best.outputs[:1])  # beam search: only the beams returned
    assert (usage.prompt_tokens, usage.completion_tokens) == (11, 10)


def test_stream_sends_head_chunks_usage_then_done_and_aborts():
    stream = ScriptedStream([output("a", (0, "hi", None)), output("a", (0, "!", "stop"))])
    chunks = serving().stream(stream, lambda out: [UsageInfo(completion_tokens=len(out.outputs))],
                              usage_chunk=lambda usage: usage, head=[UsageInfo()])
    got = asyncio.run(drain(chunks))
    assert got[-1] == "data: [DONE]\n\n" and len(got) == 5
    usage = json.loads(got[-2][len("data: "):])
    assert usage == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert stream.aborted


@pytest.mark.parametrize("error", [EngineStepError("step failed"), EngineDeadError("gone")])
def test_stream_turns_an_engine_error_into_an_error_event(error):
    stream = ScriptedStream([output("a", (0, "hi", None)), error])
    got = asyncio.run(drain(serving().stream(stream, lambda out: [UsageInfo()])))
    assert got[-1] == "data: [DONE]\n\n"
    body = json.loads(got[-2][len("data: "):])
    assert body["error"]["code"] == "engine_error" and body["error"]["message"] == str(error)
    assert stream.aborted


def test_stream_closed_by_a_disconnect_aborts():
    stream = ScriptedStream([output("a", (0, "hi", None)), HANG])

    async def first_then_close() -> str:
        events_iter = serving().stream(stream, lambda out: [UsageInfo()])
        first = await anext(events_iter)
        await events_iter.aclose()  # what Starlette does when the client goes away
        return first

    assert asyncio.run(first_then_close()).startswith("data: ")
    assert stream.aborted


def test_collect_counts_usage_and_a_failure_is_a_500():
    taken = []
    stream = ScriptedStream([output("a", (0, "hi", None)), output("a", (0, "!", "stop"))])
    usage = asyncio.run(serving().collect(stream, taken.append))
    assert len(taken) == 2 and usage.total_tokens == 6 and stream.aborted
    stream = ScriptedStream([output("a", (0, "hi", None)), EngineStepError("boom")])
    with pytest.raises(OpenAIError) as info:
        asyncio.run(serving().collect(stream, taken.append))
    assert (info.value.status, info.value.code) == (500, "engine_error") and stream.aborted


# ---- the completion handler on top of them ------------------------------------------------------
COMPLETION = {"model": MODEL, "prompt": ["x", "y"], "n": 2, "max_tokens": 4}


def two_prompts_two_choices(ids: list[str]) -> list:
    """Prompts 0 and 1, n=2 (choice i*2 + j): two deltas each, prompt 0 finishing first."""
    return [item for request_id in ids for item in (
        output(request_id, (0, "a", None), (1, "b", None)),
        output(request_id, (0, "c", "stop"), (1, "", "length")))]


def failing_after(count: int, error: Exception) -> Script:
    return lambda ids: two_prompts_two_choices(ids)[:count] + [error]


def test_completion_stream_and_whole_response_with_n_choices():
    client = TestClient(build_app(FakeEngine(two_prompts_two_choices,
                                             two_prompts_two_choices), [MODEL]))
    whole = client.post("/v1/completions", json=COMPLETION).json()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in whole["choices"]] == [
        (0, "ac", "stop"), (1, "b", "length"), (2, "ac", "stop"), (3, "b", "length")]
    assert whole["usage"] == {"prompt_tokens": 6, "completion_tokens": 6, "total_tokens": 12}
    streamed = events(client.post("/v1/completions", json={
        **COMPLETION, "stream": True, "stream_options": {"include_usage": True}}).text)
    assert streamed[-1] == "[DONE]"
    assert json.loads(streamed[-2])["usage"] == whole["usage"]
    chunks = [json.loads(e)["choices"][0] for e in streamed[:-2]]
    assert len(chunks) == 8  # every delta carries text or a finish reason
    assert "".join(c["text"] for c in chunks if c["index"] == 2) == "ac"


def test_completion_engine_failure_mid_way_is_a_500_or_an_error_event():
    engine = FakeEngine(failing_after(1, EngineStepError("step failed")),
                        failing_after(3, EngineDeadError("gone")))
    client = TestClient(build_app(engine, [MODEL]))
    response = client.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 500 and response.json()["error"]["code"] == "engine_error"
    streamed = events(client.post("/v1/completions", json={**COMPLETION, "stream": True}).text)
    assert len(streamed) == 3 * 2 + 2  # 3 outputs of 2 choice deltas, the error, [DONE]
    assert json.loads(streamed[-2])["error"] == {  # streamed events leave out null fields
        "message": "gone", "type": "server_error", "code": "engine_error"}
    assert streamed[-1] == "[DONE]"
    assert all(stream.aborted for stream in engine.streams)


# ---- the watchdog: a dead engine stops the server with status 1 ---------------------------------
def test_health_is_503_once_the_engine_stopped():
    engine = FakeEngine()
    client = TestClient(build_app(engine, [MODEL]))
    assert client.get("/health").status_code == 200
    engine.is_running = False
    assert client.get("/health").status_code == 503


def draining_server(engine: FakeEngine) -> DrainingServer:
    config = uvicorn.Config(build_app(engine, [MODEL]), lifespan="off", log_level="warning")
    return DrainingServer(config, engine, drain_timeout=1)


def test_watchdog_stops_the_server_with_exit_code_1(monkeypatch):
    monkeypatch.setattr(api_server, "DEAD_ENGINE_GRACE_S", 0.05)
    engine = FakeEngine()
    server = DrainingServer(uvicorn.Config(None), engine, drain_timeout=1, watch_interval=0.01)

    async def run() -> None:
        watchdog = asyncio.create_task(server.watch_engine())
        await asyncio.sleep(0.05)
        assert not server.should_exit and server.exit_code == 0  # the engine still runs
        engine.is_running = False
        await asyncio.wait_for(watchdog, timeout=2)

    asyncio.run(run())
    assert server.should_exit and server.force_exit and server.engine_died
    assert server.exit_code == 1


Client = Callable[[httpx.AsyncClient], Awaitable[list[asyncio.Task]]]


def serve_until_it_stops(server: DrainingServer, client: Client) -> float:
    """Serve on a free port and run `client` against it; then wait for the server to stop on
    its own. Returns how long that took after `client` returned (the tasks it leaves open are
    cancelled once the server has stopped)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return asyncio.run(_serve_until_it_stops(server, sock, url, client))


async def _serve_until_it_stops(server: DrainingServer, sock: socket.socket, url: str,
                                client: Client) -> float:
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:  # only the server ends it
        left_open = await client(http)
        since = time.monotonic()
        await asyncio.wait_for(serving, timeout=10)
        stopped_after = time.monotonic() - since
        for task in left_open:
            task.cancel()
        await asyncio.gather(*left_open, return_exceptions=True)
    return stopped_after


def test_a_dead_engine_ends_a_real_server_with_exit_code_1_even_with_a_request_open():
    # The open request's stream never ends (as if the engine died without failing it): the
    # shutdown must not wait the whole graceful timeout for it.
    engine = FakeEngine(lambda ids: [HANG])
    server = draining_server(engine)
    server.config.timeout_graceful_shutdown = 60

    async def kill_engine(http: httpx.AsyncClient) -> list[asyncio.Task]:
        assert (await http.get("/health")).status_code == 200
        body = {"model": MODEL, "prompt": "x", "max_tokens": 4, "stream": True}
        open_request = asyncio.create_task(http.post("/v1/completions", json=body))
        while not engine.streams:
            await asyncio.sleep(0.01)
        engine.is_running = False
        return [open_request]

    assert serve_until_it_stops(server, kill_engine) < 5
    assert server.exit_code == 1


def test_a_signalled_stop_keeps_exit_code_0():
    engine = FakeEngine()
    server = draining_server(engine)

    async def stop(http: httpx.AsyncClient) -> list[asyncio.Task]:
        assert (await http.get("/health")).status_code == 200
        server.should_exit = True  # what uvicorn's SIGINT/SIGTERM handler does
        return []

    assert serve_until_it_stops(server, stop) < 5
    assert server.exit_code == 0


# ---- the guards in front of the engine ----------------------------------------------------------
KEY = "sk-guard"


def test_every_route_but_health_needs_the_api_key():
    """Walk the app's own route table, so that a route added later is covered too."""
    for public_metrics in (False, True):
        app = build_app(FakeEngine(), [MODEL], api_key=KEY,
                        options=ServerOptions(public_metrics=public_metrics))
        client = TestClient(app)
        open_paths = {"/health", *PAGE_PATHS} | ({"/metrics"} if public_metrics else set())
        routes = [(method, route.path) for route in flat_routes(app.routes)
                  for method in getattr(route, "methods", None) or {"GET"}]
        assert {"/tokenize", "/detokenize", "/debug/step_stats", "/openapi.json"} <= {
            path for _, path in routes}
        for method, path in routes:
            response = client.request(method, path)
            if path in open_paths:
                assert response.status_code != 401, (method, path)
            else:
                assert response.status_code == 401, (method, path)
                if method != "HEAD":
                    assert response.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/no/such/route").status_code == 401  # unknown routes too
        authorized = client.get("/version", headers={"Authorization": f"Bearer {KEY}"})
        assert authorized.status_code == 200


def flat_routes(routes: list) -> list:
    """The routes with a path, looking inside included routers (FastAPI keeps those whole)."""
    flat = []
    for route in routes:
        if hasattr(route, "path"):
            flat.append(route)
        elif hasattr(route, "original_router"):
            flat += flat_routes(route.original_router.routes)
    return flat


def test_a_body_over_the_limit_is_a_413_before_it_is_read():
    engine = FakeEngine(two_prompts_two_choices)
    client = TestClient(build_app(engine, [MODEL], options=ServerOptions(
        max_request_body_bytes=1000)))
    big = {**COMPLETION, "prompt": "x" * 2000}
    response = client.post("/v1/completions", json=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert "1000 bytes" in response.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield json.dumps(big).encode()

    response = client.post("/v1/completions", content=chunked(),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert not engine.streams  # the engine never saw either
    assert client.post("/v1/completions", json=COMPLETION).status_code == 200


@pytest.mark.parametrize("field,value", [
    ("stream", "yes"), ("echo", "yes"), ("logprobs", "5"), ("n", "2"), ("n", 2.0),
    ("max_tokens", True), ("temperature", "0.5"), ("ignore_eos", 1), ("seed", "1"),
])
def test_wire_types_are_strict(field, value):
    engine = FakeEngine()
    response = TestClient(build_app(engine, [MODEL])).post(
        "/v1/completions", json={**COMPLETION, field: value})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field
    assert not engine.streams


@pytest.mark.parametrize("body,where", [
    ('{"model": "fake", "prompt": "\\ud800"}', "prompt"),
    ('{"model": "fake", "prompt": "x", "stop": ["ok", "\\udfff"]}', "stop[1]"),
    ('{"model": "fake", "prompt": "x", "bad_words": ["\\ud800"]}', "bad_words[0]"),
    ('{"model": "fake", "prompt": "x", "user": "a\\ud800b"}', "user"),
    ('{"model": "fake", "prompt": "x", "structured_outputs": {"json": {"\\ud800": 1}}}',
     "structured_outputs.json"),
])
def test_lone_surrogates_anywhere_are_a_400_naming_the_place(body, where):
    engine = FakeEngine()
    response = TestClient(build_app(engine, [MODEL])).post(
        "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert where in response.json()["error"]["message"]
    assert "surrogate" in response.json()["error"]["message"]
    assert not engine.streams


@pytest.mark.parametrize("depth", [100, 400, 100_000])
def test_deeply_nested_bodies_are_a_400(depth):
    schema = "[" * depth + "]" * depth
    body = f'{{"model": "fake", "prompt": "x", "guided_json": {{"type": "object", "x": {schema}}}}}'
    response = TestClient(build_app(FakeEngine(), [MODEL])).post(
        "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert "nested" in response.json()["error"]["message"] or depth > 1000


@pytest.mark.parametrize("field,value,option", [
    ("n", 9, "--max-n"), ("best_of", 9, "--max-n"), ("stop", ["s"] * 5, "--max-stop"),
    ("stop", "s" * 101, "--max-stop-chars"), ("bad_words", ["w"] * 5, "--max-bad-words"),
    ("stop_token_ids", [1] * 5, "--max-stop-token-ids"),
    ("logit_bias", {str(i): 1 for i in range(5)}, "--max-logit-bias"),
    ("allowed_token_ids", [1] * 5, "--max-allowed-token-ids"),
    ("prompt", ["p"] * 5, "--max-prompts"),
])
def test_request_limits_are_server_options_and_a_400_names_them(field, value, option):
    limits = RequestLimits(max_n=8, max_prompts=4, max_stop=4, max_stop_chars=100,
                           max_stop_token_ids=4, max_bad_words=4, max_logit_bias=4,
                           max_allowed_token_ids=4)
    engine = FakeEngine()
    client = TestClient(build_app(engine, [MODEL], options=ServerOptions(limits=limits)))
    body = {**COMPLETION, "temperature": 1.0, field: value}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and option in error["message"]
    assert not engine.streams


def test_the_openapi_document_states_the_limits_in_force():
    limits = RequestLimits(max_n=8, max_bad_words=7, max_logit_bias=6)
    app = build_app(FakeEngine(), [MODEL], options=ServerOptions(limits=limits))
    schemas = TestClient(app).get("/openapi.json").json()["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        properties = schemas[name]["properties"]
        assert properties["n"]["maximum"] == 8
        assert {"type": "array", "items": {"type": "string"}, "maxItems": 7} in (
            properties["bad_words"]["anyOf"])
        assert any(b.get("maxProperties") == 6 for b in properties["logit_bias"]["anyOf"])
    completions = TestClient(app).get("/openapi.json").json()["paths"]["/v1/completions"]
    assert {"400", "401", "413", "503"} <= set(completions["post"]["responses"])


def test_an_overloaded_engine_is_a_503_with_retry_after():
    engine = FakeEngine()
    engine.add_requests = _raising(EngineOverloadedError("the server is overloaded"))
    response = TestClient(build_app(engine, [MODEL])).post("/v1/completions", json=COMPLETION)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"]["code"] == "overloaded"


def _raising(error: Exception):
    async def add_requests(requests: list[NewRequest]):
        raise error
    return add_requests


def test_health_is_503_while_the_engine_stalls():
    engine = FakeEngine()
    client = TestClient(build_app(engine, [MODEL], options=ServerOptions(
        health_stall_timeout_s=5)))
    engine.stalled_seconds = 4.0
    assert client.get("/health").status_code == 200
    engine.stalled_seconds = 6.0
    response = client.get("/health")
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_stalled"


def test_the_watchdog_logs_a_stall_and_the_recovery(monkeypatch):
    logged = []
    monkeypatch.setattr(api_server.logger, "error", lambda msg, *a: logged.append(msg % a))
    monkeypatch.setattr(api_server.logger, "warning", lambda msg, *a: logged.append(msg % a))
    engine = FakeEngine()
    server = DrainingServer(uvicorn.Config(None), engine, drain_timeout=1, stall_timeout=5)
    engine.stalled_seconds = 6.0
    assert server._note_stall(False) is True
    assert server._note_stall(True) is True  # logged once per stall
    engine.stalled_seconds = 0.0
    assert server._note_stall(True) is False
    assert len(logged) == 2
    assert "6 s without finishing a step" in logged[0] and "progress again" in logged[1]


def test_a_request_without_max_tokens_gets_the_server_default():
    engine = FakeEngine()
    build_app(engine, [MODEL])
    assert engine.default_max_tokens == DEFAULT_MAX_TOKENS  # the fake model has no default
    engine.model_config.default_max_tokens = 300  # a generation config's max_new_tokens
    build_app(engine, [MODEL])
    assert engine.default_max_tokens == 300
    build_app(engine, [MODEL], options=ServerOptions(limits=RequestLimits(
        max_tokens_default=50)))
    assert engine.default_max_tokens == 50


# ---- the OpenAPI document states what the server takes (test_schemathesis.py fuzzes it) ---------
def openapi(app) -> dict:
    return TestClient(app).get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()


def test_the_openapi_document_states_the_model_bounds_and_the_api_key():
    doc = openapi(build_app(FakeEngine(), [MODEL, "alias"], api_key=KEY))
    schemas = doc["components"]["schemas"]
    completion = schemas["CompletionRequest"]["properties"]
    assert {"type": "string", "enum": [MODEL, "alias", ""]} in completion["model"]["anyOf"]
    token_ids = next(b for b in completion["stop_token_ids"]["anyOf"] if b["type"] == "array")
    assert (token_ids["items"]["minimum"], token_ids["items"]["exclusiveMaximum"]) == (
        0, VOCAB_SIZE)
    max_tokens = next(b for b in completion["max_tokens"]["anyOf"] if b["type"] == "integer")
    assert (max_tokens["minimum"], max_tokens["maximum"]) == (1, 63)  # max_model_len 64 - 1
    assert schemas["DetokenizeRequest"]["properties"]["tokens"]["maxItems"] == 64
    assert "x-pagedllm-limits" not in json.dumps(doc)  # every placeholder filled in
    assert doc["components"]["securitySchemes"]["APIKey"]["scheme"] == "bearer"
    assert doc["paths"]["/v1/completions"]["post"]["security"] == [{"APIKey": []}]
    assert "security" not in doc["paths"]["/health"]["get"]
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "content" not in doc["paths"]["/health"]["get"]["responses"]["200"]
    assert "securitySchemes" not in openapi(build_app(FakeEngine(), [MODEL]))["components"]


def test_the_logit_bias_key_pattern_is_exactly_the_token_ids():
    doc = openapi(build_app(FakeEngine(), [MODEL], api_key=KEY))
    bias = doc["components"]["schemas"]["CompletionRequest"]["properties"]["logit_bias"]
    pattern = re.compile(next(b for b in bias["anyOf"] if b["type"] == "object")[
        "propertyNames"]["pattern"])
    assert [k for k in map(str, range(VOCAB_SIZE + 50)) if pattern.search(k)] == [
        str(i) for i in range(VOCAB_SIZE)]
    assert pattern.search("007") and not any(pattern.search(k) for k in ("-1", "-0", "", "1a"))
    for n in (1, 9, 10, 11, 1000, 49152, 151936):
        exact = re.compile(f"^0*(?:{decimal_below(n)})$")
        assert [k for k in map(str, range(n + 20)) if exact.search(k)] == list(
            map(str, range(n)))


@pytest.mark.parametrize("key,status", [("007", 200), ("-0", 400), ("\u0663", 400)])
def test_logit_bias_keys_are_token_ids_in_ascii_digits(key, status):
    """As the document's pattern says: "-0" and the Arabic-Indic digit three are not."""
    engine = FakeEngine(two_prompts_two_choices)
    response = TestClient(build_app(engine, [MODEL])).post(
        "/v1/completions", json={**COMPLETION, "temperature": 1.0, "logit_bias": {key: 1}})
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["error"]["param"] == "logit_bias" and not engine.streams


def test_max_completion_tokens_0_is_refused_not_taken_as_unset():
    """It was read with `or`, so 0 fell back to max_tokens and the request ran."""
    response = TestClient(build_app(FakeEngine(), [MODEL])).post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0,
        "max_tokens": 4})
    assert response.status_code == 400
    assert "max_tokens must be at least 1" in response.json()["error"]["message"]


@pytest.mark.parametrize("options", [{"health_stall_timeout_s": 0},
                                     {"health_stall_timeout_s": -5},
                                     {"max_request_body_bytes": 0}])
def test_nonsense_server_options_are_refused(options):
    with pytest.raises(ValueError, match="must be positive"):
        ServerOptions(**options)
