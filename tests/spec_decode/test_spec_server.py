"""`pagedllm serve --speculative-config`: the flag reaches the engine (its core in its own
process, the server's default), completions are the plain greedy ones, /metrics counts drafts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from entrypoints.server_utils import running_server  # noqa: E402

PROMPT = "one two three four five six seven one two three four five six seven one two"


@pytest.mark.slow  # a server start: the offline tests cover the engine; this, the wiring
def test_serve_with_ngram_speculation(tmp_path, llm):
    config = json.dumps({"method": "ngram", "num_speculative_tokens": 4})
    with running_server(tmp_path, "--speculative-config", config, "--dtype", "float32",
                        "--kv-cache-memory", "256MiB") as server:
        body = {"model": server_model(server), "prompt": PROMPT, "max_tokens": 16,
                "temperature": 0}
        reply = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        steps = httpx.get(server.url + "/debug/step_stats", timeout=10).json()
    from pagedllm import SamplingParams

    (expected,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16),
                               use_tqdm=False)
    assert reply["choices"][0]["text"] == expected.outputs[0].text
    accepted = counter(metrics, "pagedllm:spec_decode_num_accepted_tokens_total")
    assert accepted > 0 and counter(metrics, "pagedllm:spec_decode_num_drafts_total") > 0
    assert steps["spec_decoding"]["num_accepted_tokens"] == accepted
    assert any(s["spec_accepted_per_position"] for s in steps["steps"])
    assert "speculative decoding: ngram" in server.log_tail(20_000)


def server_model(server) -> str:
    return httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]


def counter(metrics: str, name: str) -> float:
    (line,) = [line for line in metrics.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])
