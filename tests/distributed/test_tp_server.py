"""`pagedllm serve --tensor-parallel-size 2` through the official openai client: completions and
chat, streamed and not, give what one rank gives; SIGTERM shuts it down with no worker process
left behind; a rank killed mid-stream ends the stream with an error and the server exits
non-zero within seconds."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))  # tiny_models.py

from entrypoints.server_utils import (  # noqa: E402
    DEAD_ENGINE_EXIT_S,
    engine_state,
    health_after_death,
    killed_at_exit,
    launch_server,
    stream_until_killed,
)
from tiny_models import save_tiny_model  # noqa: E402

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.model.source import resolve_model_source  # noqa: E402
from pagedllm.tokenizer import load_tokenizer  # noqa: E402

MODEL = "tiny-tp"
PROMPT = "San Francisco is a"
MAX_TOKENS = 8
SERVE = ("--served-model-name", MODEL, "--dtype", "float32", "--kv-cache-memory", "64MiB",
         "--tensor-parallel-size", "2", "--disable-access-log")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny Llama (4 heads, 2 KV heads) with the default model's tokenizer, so text goes in
    and out."""
    folder = tmp_path_factory.mktemp("tp-serve")
    tokenizer = load_tokenizer(resolve_model_source(None))
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=len(tokenizer), max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    save_tiny_model(config, folder)
    tokenizer.save_pretrained(folder)
    return folder


def alive(pid: int) -> bool:
    """Is the process running (a zombie nobody has reaped yet counts as gone)?"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def all_gone(pids: list[int], timeout_s: float = 10) -> bool:
    """Have all these processes ended (waiting up to `timeout_s` for them to)?"""
    deadline = time.monotonic() + timeout_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(alive(pid) for pid in pids)


def test_serves_like_one_rank_and_shuts_down_cleanly(folder, tmp_path):
    one_rank = LLM(str(folder), dtype="float32", kv_cache_memory_bytes=64 << 20)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = one_rank.generate([PROMPT], greedy, use_tqdm=False)[0].outputs[0].text
    messages = [{"role": "user", "content": "Say hi"}]
    expected_chat = one_rank.chat(messages, greedy, use_tqdm=False)[0].outputs[0].text
    with killed_at_exit(launch_server(tmp_path, str(folder), *SERVE)) as server:
        server.wait_until_healthy()
        with httpx.Client(base_url=server.url, timeout=60) as http:
            workers = engine_state(http)["worker_pids"]
        assert len(workers) == 2 and all(alive(pid) for pid in workers)
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        common = dict(model=MODEL, max_tokens=MAX_TOKENS, temperature=0,
                      extra_body={"ignore_eos": True})
        assert client.completions.create(prompt=PROMPT, **common).choices[0].text == expected
        stream = client.completions.create(prompt=PROMPT, stream=True, **common)
        assert "".join(chunk.choices[0].text for chunk in stream) == expected
        chat = client.chat.completions.create(messages=messages, **common)
        assert chat.choices[0].message.content == expected_chat
        stream = client.chat.completions.create(messages=messages, stream=True, **common)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
            expected_chat
        assert server.stop(signal.SIGTERM) == 0, server.log_tail()
        assert all_gone(workers), "worker processes outlived the server"


def test_a_killed_rank_ends_the_server(folder, tmp_path):
    """SIGKILL the second rank during a stream: the stream ends with an engine error, /health
    stops answering 200, and the server exits non-zero within seconds instead of hanging in
    the first rank's collective."""
    with killed_at_exit(launch_server(tmp_path, str(folder), *SERVE)) as server:
        server.wait_until_healthy()
        with httpx.Client(base_url=server.url, timeout=60) as http:
            workers = engine_state(http)["worker_pids"]
        events = stream_until_killed(server, workers[1])
        assert events[-1] == "[DONE]", events[-3:]
        assert '"engine_error"' in events[-2], events[-3:]
        assert health_after_death(server) in (503, None)
        assert server.proc.wait(DEAD_ENGINE_EXIT_S) != 0, server.log_tail()
        assert all_gone(workers), server.log_tail()
