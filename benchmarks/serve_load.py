"""Load test for `pagedllm serve`: `pagedllm bench serve` swept over numbers of concurrent
streaming clients, on 127.0.0.1.

    python benchmarks/serve_load.py --launch                    # start a server, measure, stop it
    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000 --api-key KEY

Each level sends `--rounds` x concurrency requests at once with at most `concurrency` in flight,
so every client keeps one request going; each request generates exactly `--output-len` tokens
(ignore_eos). The requests and the measurements are pagedllm/bench/serve.py's; this script adds
the sweep, the first level as the baseline, the largest batch the engine ran (from pagedllm's
/debug/step_stats, when the server has it) and `--launch`. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx

from pagedllm.bench.dataset import synthetic_text_workload
from pagedllm.bench.serve import (
    CHAT,
    LoadSpec,
    add_load_args,
    benchmark,
    first_model,
    make_client,
)


async def step_count(client: httpx.AsyncClient) -> int | None:
    """The engine's steps so far; None for a server without pagedllm's debug route."""
    response = await client.get("/debug/step_stats", params={"since": 10**9})
    return response.json()["num_steps"] if response.status_code == 200 else None


async def largest_batch(client: httpx.AsyncClient, since: int | None) -> int | None:
    if since is None:
        return None
    steps = (await client.get("/debug/step_stats", params={"since": since})).json()["steps"]
    return max((len(step["scheduled"]) for step in steps), default=0)


async def run_level(client: httpx.AsyncClient, args: argparse.Namespace, model: str,
                    concurrency: int, seed: int) -> dict[str, Any]:
    work = synthetic_text_workload(concurrency * args.rounds, args.input_len, args.output_len,
                                   args.range_ratio, seed)
    spec = LoadSpec(model, args.endpoint, math.inf, concurrency, args.ignore_eos, seed)
    before = await step_count(client)
    report = await benchmark(client, spec, work)
    return {"concurrency": concurrency, "max_batch_size": await largest_batch(client, before),
            **report}


async def sweep(args: argparse.Namespace, base_url: str) -> list[dict[str, Any]]:
    async with make_client(base_url, args.api_key, max(args.concurrency)) as client:
        model = args.model or await first_model(client)
        warm_up = synthetic_text_workload(1, args.input_len, 4, 0.0, seed=-1)
        await benchmark(client, LoadSpec(model, args.endpoint), warm_up)  # not measured
        # A seed per level: no level's prompts are prefix-cache hits from an earlier one.
        return [await run_level(client, args, model, concurrency, args.seed + i)
                for i, concurrency in enumerate(args.concurrency)]


def print_table(levels: list[dict[str, Any]]) -> None:
    baseline = levels[0]["output_throughput"] or math.nan
    print(f"{'clients':>7} {'done':>5} {'failed':>6} {'tok/s':>8} {'vs first':>8} "
          f"{'mean TTFT s':>11} {'p90 TTFT s':>10} {'mean e2e s':>10} {'max batch':>9}")
    for lv in levels:
        ttft, e2e = lv["ttft_ms"] or {}, lv["e2e_ms"] or {}
        print(f"{lv['concurrency']:>7} {lv['completed']:>5} {lv['failed']:>6} "
              f"{lv['output_throughput']:>8.1f} {lv['output_throughput'] / baseline:>7.1f}x "
              f"{ttft.get('mean', math.nan) / 1e3:>11.2f} {ttft.get('p90', math.nan) / 1e3:>10.2f} "
              f"{e2e.get('mean', math.nan) / 1e3:>10.2f} {lv['max_batch_size'] or '-':>9}")
    for lv in levels:
        for error in lv["errors"][:3]:
            print(f"clients {lv['concurrency']}, request {error['index']}: {error['error']}")


# ---- optionally run the server too --------------------------------------------------------------
def launch(extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--port", str(port),
               "--disable-access-log", "--uvicorn-log-level", "warning", *extra]
    env = {**os.environ, "PAGEDLLM_API_KEY": ""}  # the launched server takes no key
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


def add_launch_args(parser: argparse.ArgumentParser, server_args: str) -> None:
    parser.add_argument("--launch", action="store_true", help="start a server for the run")
    parser.add_argument("--server-args", default=server_args,
                        help="extra `pagedllm serve` arguments with --launch")


@contextlib.contextmanager
def target_server(args: argparse.Namespace) -> Iterator[str]:
    """The URL to measure: --base-url, or with --launch a server (no API key) started for the
    run and stopped after it."""
    if not args.launch:
        yield args.base_url
        return
    proc, url = launch(args.server_args.split())
    args.api_key = None
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_args(parser)
    # Streaming chat, short outputs: the workload behind the figures in docs/benchmarks.md.
    parser.set_defaults(endpoint=CHAT, input_len=16, output_len=32,
                        api_key=os.environ.get("PAGEDLLM_API_KEY")
                        or os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    add_launch_args(parser, "--kv-cache-memory 1GiB")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with target_server(args) as url:
        levels = asyncio.run(sweep(args, url))
    print_table(levels)
    print(json.dumps({"output_len": args.output_len, "levels": levels}))


if __name__ == "__main__":
    main()
