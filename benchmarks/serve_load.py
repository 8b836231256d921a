"""Load test for `pagedllm serve`: output tokens/s and time to first token at several numbers of
concurrent streaming clients, on 127.0.0.1.

    python benchmarks/serve_load.py --launch                    # start a server, measure, stop it
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key KEY

Each level runs `--rounds` x concurrency streaming chat requests (every client keeps one request
in flight), each generating exactly `--max-tokens` tokens (ignore_eos). A level stops starting
new requests after `--max-seconds`. The baseline is the same run's concurrency 1. Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import httpx

PROMPTS = ["Tell me about the ocean.", "Write a short poem about trees.",
           "Explain what a CPU does.", "List three fruits and their colors.",
           "Describe a sunny day in the city.", "What is the capital of Italy?"]


@dataclass
class Sample:
    ttft_s: float
    e2e_s: float
    output_tokens: int


@dataclass
class Level:
    concurrency: int
    requests: int
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    mean_ttft_s: float
    p90_ttft_s: float
    mean_e2e_s: float
    max_batch_size: int


async def one_request(client: httpx.AsyncClient, model: str, prompt: str,
                      max_tokens: int) -> Sample:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - started
    return Sample(ttft if ttft is not None else float("nan"), time.perf_counter() - started,
                  tokens)


async def run_level(client: httpx.AsyncClient, model: str, concurrency: int, rounds: int,
                    max_tokens: int, max_seconds: float) -> Level:
    before = (await client.get("/debug/step_stats", params={"since": 10**9})).json()["num_steps"]
    total = concurrency * rounds
    next_index = 0
    samples: list[Sample] = []
    started = time.perf_counter()

    async def worker() -> None:
        nonlocal next_index
        while next_index < total and time.perf_counter() - started < max_seconds:
            index, next_index = next_index, next_index + 1
            samples.append(await one_request(client, model, PROMPTS[index % len(PROMPTS)],
                                             max_tokens))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    steps = (await client.get("/debug/step_stats", params={"since": before})).json()["steps"]
    ttfts = sorted(s.ttft_s for s in samples)
    tokens = sum(s.output_tokens for s in samples)
    return Level(concurrency, len(samples), wall, tokens, tokens / wall,
                 statistics.fmean(ttfts), ttfts[math.ceil(0.9 * len(ttfts)) - 1],  # nearest rank
                 statistics.fmean(s.e2e_s for s in samples),
                 max((len(s["scheduled"]) for s in steps), default=0))


async def measure(args: argparse.Namespace, url: str) -> list[Level]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600,
                                 limits=limits) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        await one_request(client, model, "Hello", 4)  # warm-up, not measured
        levels = []
        for concurrency in args.concurrency:
            levels.append(await run_level(client, model, concurrency, args.rounds,
                                          args.max_tokens, args.max_seconds))
        return levels


def print_table(levels: list[Level]) -> None:
    baseline = levels[0].output_tokens_per_s
    print(f"{'clients':>7} {'requests':>8} {'tok/s':>8} {'vs first':>8} {'mean TTFT s':>11} "
          f"{'p90 TTFT s':>10} {'mean e2e s':>10} {'max batch':>9}")
    for lv in levels:
        print(f"{lv.concurrency:>7} {lv.requests:>8} {lv.output_tokens_per_s:>8.1f} "
              f"{lv.output_tokens_per_s / baseline:>7.1f}x {lv.mean_ttft_s:>11.2f} "
              f"{lv.p90_ttft_s:>10.2f} {lv.mean_e2e_s:>10.2f} {lv.max_batch_size:>9}")


# ---- optionally run the server too --------------------------------------------------------------
def launch(extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--port", str(port),
               "--disable-access-log", "--uvicorn-log-level", "warning", *extra]
    env = {**os.environ, "PAGEDLLM_API_KEY": ""}
    proc = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not become healthy")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=os.environ.get("PAGEDLLM_API_KEY"))
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="per level: start no new request after this")
    parser.add_argument("--launch", action="store_true", help="start a server for the run")
    parser.add_argument("--server-args", default="--kv-cache-memory 1GiB",
                        help="extra `pagedllm serve` arguments with --launch")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    proc, url = launch(args.server_args.split()) if args.launch else (None, args.url)
    if proc is not None:
        args.api_key = None
    try:
        levels = asyncio.run(measure(args, url))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    print_table(levels)
    print(json.dumps({"max_tokens": args.max_tokens, "levels": [asdict(lv) for lv in levels]}))


if __name__ == "__main__":
    main()
