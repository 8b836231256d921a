"""`pagedllm bench serve` against a real `pagedllm serve` of the tiny model, over HTTP.

The tiny model's tokenizer has one token per word of the synthetic prompts, so the server's
usage must report exactly the prompt and output lengths the benchmark asked for.
"""

from __future__ import annotations

import asyncio
import json
import math
import random

import httpx
import pytest

# tests/ is on sys.path (this folder is a package there), so is the entrypoints tests' helper.
from entrypoints.server_utils import ServerProcess, free_port, running_server

from pagedllm.bench.dataset import WorkItem, synthetic_text_workload
from pagedllm.bench.serve import LoadSpec, RequestResult, arrival_offsets, send_request
from pagedllm.entrypoints.cli import main

from .helpers import MAX_POSITIONS, write_jsonl

API_KEY = "sk-bench"
NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 8, 10, 6


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("bench-serve"), str(tiny_model),
                        "--max-model-len", str(MAX_POSITIONS), "--kv-cache-memory", "16MiB",
                        "--disable-access-log", api_key=API_KEY) as server:
        yield server


def run_serve(server: ServerProcess, tmp_path, *extra: str) -> dict:
    report_path = tmp_path / "serve.json"
    code = main(["bench", "serve", "--base-url", server.url, "--num-prompts", str(NUM_PROMPTS),
                 "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
                 "--output-json", str(report_path), *extra])
    assert code == 0
    return json.loads(report_path.read_text())


def num_steps(server: ServerProcess) -> int:
    stats = httpx.get(server.url + "/debug/step_stats", params={"since": 10**9},
                      headers=server.headers).json()
    return stats["num_steps"]


def largest_batch_since(server: ServerProcess, step: int) -> int:
    stats = httpx.get(server.url + "/debug/step_stats", params={"since": step},
                      headers=server.headers).json()
    return max(len(s["scheduled"]) for s in stats["steps"])


def served_model(server: ServerProcess) -> str:
    models = httpx.get(server.url + "/v1/models", headers=server.headers).json()
    return models["data"][0]["id"]


def assert_all_completed(report: dict, output_tokens: int) -> None:
    assert (report["completed"], report["failed"], report["errors"]) == (NUM_PROMPTS, 0, [])
    assert report["output_tokens"] == output_tokens  # ignore_eos: exactly what was asked
    assert report["duration_s"] > 0 and report["request_throughput"] > 0
    assert report["total_token_throughput"] > report["output_throughput"] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        summary = report[key]
        assert 0 < summary["p50"] <= summary["p90"] <= summary["p99"], key
    assert report["ttft_ms"]["count"] == report["e2e_ms"]["count"] == NUM_PROMPTS
    assert report["ttft_ms"]["mean"] < report["e2e_ms"]["mean"]


def test_completions_at_fixed_concurrency(server, tmp_path):
    first_step = num_steps(server)
    report = run_serve(server, tmp_path, "--api-key", API_KEY, "--max-concurrency", "4",
                       "--range-ratio", "0.5", "--seed", "3")
    work = synthetic_text_workload(NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN, 0.5, seed=3)
    assert_all_completed(report, sum(w.output_len for w in work))
    # usage is the server's count: one token per word with this tokenizer
    assert report["prompt_tokens"] == sum(len(w.prompt.split()) for w in work)
    # ITL: a gap between each two content chunks, at most one chunk per token (a special token
    # the random model draws decodes to no text, so it sends no chunk)
    assert 0 < report["itl_ms"]["count"] <= sum(w.output_len - 1 for w in work)
    assert report["model"] == served_model(server)  # the first of GET /v1/models
    assert largest_batch_since(server, first_step) <= 4  # the semaphore held


def test_chat_at_a_poisson_rate(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # the key from the environment this time
    rate, seed = 20.0, 5
    report = run_serve(server, tmp_path, "--endpoint", "/v1/chat/completions",
                       "--request-rate", str(rate), "--seed", str(seed))
    assert_all_completed(report, NUM_PROMPTS * OUTPUT_LEN)
    # the chat template adds "user" and "assistant" to each prompt
    assert report["prompt_tokens"] == NUM_PROMPTS * (INPUT_LEN + 2)
    last_send = arrival_offsets(NUM_PROMPTS, rate, random.Random(seed))[-1]
    assert report["duration_s"] > last_send > 0
    assert report["config"]["request_rate"] == rate


def test_a_failed_request_is_counted_and_the_run_goes_on(server, tmp_path):
    too_long = " ".join(["sea"] * (MAX_POSITIONS + 10))
    dataset = write_jsonl(tmp_path / "data.jsonl", [
        {"prompt": "the sea", "output_len": 3},
        {"prompt": too_long, "output_len": 3},
        {"prompt": "a river", "output_len": 4},
    ])
    report = run_serve(server, tmp_path, "--api-key", API_KEY, "--dataset", str(dataset),
                       "--num-prompts", "3")
    assert (report["num_prompts"], report["completed"], report["failed"]) == (3, 2, 1)
    assert report["output_tokens"] == 3 + 4
    (error,) = report["errors"]
    assert error["index"] == 1
    assert error["error"].startswith("HTTP 400: ") and "max_model_len" in error["error"]


def test_every_request_fails_for_an_unknown_model(server, tmp_path):
    report = run_serve(server, tmp_path, "--api-key", API_KEY, "--model", "no-such-model",
                       "--max-concurrency", "2")
    assert (report["completed"], report["failed"]) == (0, NUM_PROMPTS)
    assert report["output_tokens"] == 0 and report["ttft_ms"] is None
    assert all(e["error"].startswith("HTTP 404: ") and "does not exist" in e["error"]
               for e in report["errors"])


def test_wrong_api_key_and_no_server_are_clear_errors(server, capsys):
    assert main(["bench", "serve", "--base-url", server.url, "--api-key", "wrong"]) == 2
    assert "GET /v1/models: HTTP 401" in capsys.readouterr().err
    nobody = f"http://127.0.0.1:{free_port()}/v1"
    assert main(["bench", "serve", "--base-url", nobody]) == 2
    assert "cannot reach http://127.0.0.1" in capsys.readouterr().err


def test_arrival_offsets_are_poisson_and_seeded():
    assert arrival_offsets(3, math.inf, random.Random(0)) == [0.0, 0.0, 0.0]
    offsets = arrival_offsets(2000, 50.0, random.Random(1))
    assert offsets == arrival_offsets(2000, 50.0, random.Random(1))
    assert offsets[0] == 0 and offsets == sorted(offsets)
    mean_gap = offsets[-1] / (len(offsets) - 1)
    assert mean_gap == pytest.approx(1 / 50, rel=0.1)


def sse(*events: dict | str) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n"
                   for e in events).encode()


def chat_chunk(content: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": content}}]}


async def send_to(body: bytes) -> RequestResult:
    """One request to a canned stream: the other servers' shapes, without a server."""
    def reply(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(reply),
                                 base_url="http://test") as client:
        return await send_request(client, LoadSpec("m", endpoint="/v1/chat/completions"),
                                  WorkItem(4, prompt="hi"), index=0)


def test_stream_without_usage_counts_chunks_and_an_error_event_fails():
    result = asyncio.run(send_to(sse(chat_chunk(""), chat_chunk("a"), chat_chunk(" b"),
                                     chat_chunk(" c"), "[DONE]")))
    assert result.ok and result.output_tokens == 3 and len(result.itl_s) == 2
    assert result.ttft_s is not None and result.tpot_s is not None
    result = asyncio.run(send_to(sse(chat_chunk("a"),
                                     {"error": {"message": "engine died", "code": 500}})))
    assert not result.ok and result.error == "error in stream: engine died"
