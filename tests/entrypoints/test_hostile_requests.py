"""Issue 16's table of hostile requests, each sent to a real server while four other users
stream: the bad request gets its 4xx (or is served without harm), and every victim stream still
ends with finish_reason "length" and exactly the text it gets when it runs alone."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from .server_utils import ServerProcess, running_server

API_KEY = "sk-hostile"
VICTIM_PROMPTS = ["The capital of France is", "Once upon a time, a dragon",
                  "def fibonacci(n):", "My favourite colour is"]
VICTIM_TOKENS = 16
MAX_TOKENS_DEFAULT = 12
TWENTY_MB = 20 * 2**20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # float32: in bf16 a greedy near-tie can flip with the batch's shape, and the victims are
    # compared with what they got in batches of their own
    with running_server(tmp_path_factory.mktemp("hostile"), "--kv-cache-memory", "512MiB",
                        "--dtype", "float32", "--max-tokens-default", str(MAX_TOKENS_DEFAULT),
                        "--disable-access-log", api_key=API_KEY) as server:
        yield server


@dataclass
class Victim:
    text: str = ""
    finish_reason: str | None = None
    done: bool = False  # the stream ended with [DONE]


async def victim(http: httpx.AsyncClient, prompt: str) -> Victim:
    body = {"prompt": prompt, "max_tokens": VICTIM_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True}
    result = Victim()
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                result.done = True
                continue
            choice = json.loads(data)["choices"][0]
            result.text += choice.get("text", "")  # a stream leaves out null fields
            result.finish_reason = choice.get("finish_reason") or result.finish_reason
    return result


def client(server: ServerProcess, key: bool = True) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, timeout=300,
                             headers=server.headers if key else {})


@pytest.fixture(scope="module")
def alone(server: ServerProcess) -> list[Victim]:
    """What each victim gets with nobody else on the server."""
    async def run() -> list[Victim]:
        async with client(server) as http:
            return [await victim(http, p) for p in VICTIM_PROMPTS]
    results = asyncio.run(run())
    assert all(r.finish_reason == "length" and r.done for r in results)
    return results


Send = Any  # async (http, keyless http) -> httpx.Response


async def with_victims(server: ServerProcess, send: Send) -> tuple[httpx.Response, list[Victim]]:
    async with client(server) as http, client(server, key=False) as keyless:
        victims = [asyncio.create_task(victim(http, p)) for p in VICTIM_PROMPTS]
        await asyncio.sleep(0.3)  # the victims are streaming when the bad request arrives
        response = await send(http, keyless)
        return response, list(await asyncio.gather(*victims))


def post(path: str, body: Any = None, content: bytes | None = None, key: bool = True) -> Send:
    async def send(http: httpx.AsyncClient, keyless: httpx.AsyncClient) -> httpx.Response:
        session = http if key else keyless
        if content is not None:
            return await session.post(path, content=content,
                                      headers={"Content-Type": "application/json"})
        return await session.post(path, json=body)
    return send


LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 800  # ~8,000 tokens
DEEP_SCHEMA = '{"type": "object", "properties": {"a": ' * 400 + "{}" + "}}" * 400
CASES = {
    # name: (request, expected status, words its error message must contain)
    "seed 2**64-1 with n=2": (post("/v1/completions", {
        "prompt": "Hi", "n": 2, "temperature": 1, "seed": 2**64 - 1, "max_tokens": 4}),
        200, []),
    "seed 2**64-1 with best_of=2": (post("/v1/completions", {
        "prompt": "Hi", "best_of": 2, "temperature": 1, "seed": 2**64 - 1, "max_tokens": 4}),
        200, []),
    "top_k 2**63": (post("/v1/completions", {"prompt": "Hi", "top_k": 2**63}), 400, ["top_k"]),
    "cache_salt lone surrogate": (post("/v1/completions", content=(
        '{"prompt": "' + "word " * 40 + '", "cache_salt": "\\ud800"}').encode()),
        400, ["cache_salt", "surrogate"]),
    "length_penalty 1e308": (post("/v1/completions", {
        "prompt": "Hi", "use_beam_search": True, "n": 2, "length_penalty": 1e308}),
        400, ["length_penalty"]),
    "length_penalty -1e308": (post("/v1/completions", {
        "prompt": "Hi", "use_beam_search": True, "n": 2, "length_penalty": -1e308}),
        400, ["length_penalty"]),
    "50,000 bad_words": (post("/v1/completions", {
        "prompt": "Hi", "bad_words": [f"w{i}" for i in range(50_000)]}),
        400, ["bad_words", "--max-bad-words"]),
    "bad_words at the cap": (post("/v1/completions", {
        "prompt": "Hi", "bad_words": [f"w{i}" for i in range(256)], "max_tokens": 8}), 200, []),
    "20 MB prompt": (post("/v1/completions", {"prompt": "a" * TWENTY_MB}), 413, ["body"]),
    "prompt longer in characters than the context": (post("/v1/completions", {
        "prompt": "a" * 2_000_000}), 400, ["characters", "max_model_len"]),
    "echo + logprobs 20 on 8,000 tokens": (post("/v1/completions", {
        "prompt": LONG_TEXT, "echo": True, "logprobs": 20, "max_tokens": 1}), 200, []),
    "20 MB /tokenize without the key": (post("/tokenize", {"prompt": "a" * TWENTY_MB},
                                             key=False), 401, ["API key"]),
    "20 MB /tokenize with the key": (post("/tokenize", {"prompt": "a" * TWENTY_MB}),
                                     413, ["body"]),
    "6.6M ids /detokenize without the key": (post("/detokenize", {"tokens": [1] * 6_600_000},
                                                  key=False), 401, ["API key"]),
    "6.6M ids /detokenize with the key": (post("/detokenize", {"tokens": [1] * 6_600_000}),
                                          413, ["body"]),
    "lone surrogate in prompt": (post("/v1/completions", content=b'{"prompt": "a\\ud800"}'),
                                 400, ["prompt", "surrogate"]),
    "lone surrogate in /tokenize": (post("/tokenize", content=b'{"prompt": "\\udc00"}'),
                                    400, ["prompt", "surrogate"]),
    "lone surrogate in bad_words": (post("/v1/completions", content=(
        b'{"prompt": "Hi", "bad_words": ["\\ud800"]}')), 400, ["bad_words", "surrogate"]),
    "json_schema nested 400 deep": (post("/v1/completions", content=(
        '{"prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": '
        '{"name": "x", "schema": ' + DEEP_SCHEMA + "}}}").encode()), 400, ["nested"]),
    "stream: 'yes'": (post("/v1/completions", {"prompt": "Hi", "stream": "yes"}), 400,
                      ["stream", "boolean"]),
    "logprobs: 'yes'": (post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "logprobs": "yes"}), 400,
        ["logprobs", "boolean"]),
    "chat without max_tokens": (post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Count to one thousand."}],
        "ignore_eos": True}), 200, []),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_hostile_request_does_not_hurt_the_others(server, alone, name):
    send, status, words = CASES[name]
    response, victims = asyncio.run(with_victims(server, send))
    assert response.status_code == status, response.text[:500]
    if status >= 400:
        message = response.json()["error"]["message"]
        assert all(word in message for word in words), message
    for got, expected in zip(victims, alone):
        assert got.done and got.finish_reason == "length"
        assert got.text == expected.text
    if name == "chat without max_tokens":  # the server's default, not the whole context
        usage = response.json()["usage"]
        assert usage["completion_tokens"] == MAX_TOKENS_DEFAULT
        assert response.json()["choices"][0]["finish_reason"] == "length"


def test_the_server_is_idle_and_healthy_afterwards(server):
    stats = httpx.get(server.url + "/debug/step_stats", headers=server.headers).json()
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["num_free_blocks"] == stats["num_blocks"]  # every block came back
    assert httpx.get(server.url + "/health").status_code == 200
