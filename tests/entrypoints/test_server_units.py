"""The server's parts that need no model: the shared stream/collect helpers of the handlers,
and the watchdog that stops the server (with a non-zero exit status) when its engine dies.
A scripted fake stands in for AsyncLLM, so these run in well under a second each."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from pagedllm.engine.async_llm import EngineDeadError, EngineStepError, NewRequest
from pagedllm.entrypoints.openai import api_server
from pagedllm.entrypoints.openai.api_server import DrainingServer, build_app
from pagedllm.entrypoints.openai.errors import OpenAIError
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
