"""Does an open dashboard slow serving down? `pagedllm bench serve`'s load, run in rounds that
alternate between no dashboard client and one reading /dashboard/stream the whole round (what an
open page does), on one server.

    python benchmarks/dashboard_overhead.py --launch            # start a server, measure, stop it
    python benchmarks/dashboard_overhead.py --base-url http://127.0.0.1:8000 --api-key KEY

Alternating rounds (closed, open, closed, open, ...) spread the drift of a shared machine over
both sides; the medians of each side are compared. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.serve_load import add_launch_args, target_server
from pagedllm.bench.dataset import synthetic_text_workload
from pagedllm.bench.serve import LoadSpec, add_load_args, benchmark, first_model, make_client


@dataclass
class StreamReader:
    """One dashboard client: reads the stream until cancelled, counting what it got."""

    updates: int = 0
    bytes: int = 0
    snapshot_ms: list[float] = field(default_factory=list)  # the core's time per snapshot

    async def read(self, client: httpx.AsyncClient) -> None:
        async with client.stream("GET", "/dashboard/stream") as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                self.bytes += len(line) + 1
                if line.startswith("data: {"):
                    self.updates += 1
                    self.snapshot_ms.append(json.loads(line[6:])["snapshot_ms"])


async def one_round(client: httpx.AsyncClient, spec: LoadSpec, args: argparse.Namespace,
                    seed: int, watched: bool) -> dict[str, Any]:
    work = synthetic_text_workload(args.num_prompts, args.input_len, args.output_len,
                                   args.range_ratio, seed)
    reader, task = StreamReader(), None
    if watched:
        task = asyncio.create_task(reader.read(client))
        while reader.updates < 1:  # the sampler runs before the load starts
            await asyncio.sleep(0.05)
            if task.done():
                task.result()  # raises what went wrong (401, no route)
    report = await benchmark(client, spec, work)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return {"watched": watched, "updates": reader.updates, "stream_bytes": reader.bytes,
            "snapshot_ms": reader.snapshot_ms, **report}


async def measure(args: argparse.Namespace, base_url: str) -> list[dict[str, Any]]:
    async with make_client(base_url, args.api_key, args.max_concurrency + 2) as client:
        model = args.model or await first_model(client)
        spec = LoadSpec(model, args.endpoint, math.inf, args.max_concurrency, args.ignore_eos)
        warm_up = synthetic_text_workload(args.max_concurrency, args.input_len, 8, 0.0, seed=-1)
        await benchmark(client, spec, warm_up)  # not measured
        rounds = []
        for i in range(2 * args.rounds):  # a new seed per round: no prefix-cache hits across
            rounds.append(await one_round(client, spec, args, args.seed + i, watched=i % 2 == 1))
        return rounds


def side(rounds: list[dict[str, Any]], watched: bool) -> dict[str, float]:
    mine = [r for r in rounds if r["watched"] == watched]
    seconds = sum(r["duration_s"] for r in mine)
    return {
        "output_tok_s": statistics.median(r["output_throughput"] for r in mine),
        "tpot_ms": statistics.median(r["tpot_ms"]["mean"] for r in mine),
        "ttft_ms": statistics.median(r["ttft_ms"]["mean"] for r in mine),
        "updates_per_s": sum(r["updates"] for r in mine) / seconds,
        "stream_kb_per_s": sum(r["stream_bytes"] for r in mine) / seconds / 1e3,
        "snapshot_ms": statistics.mean([ms for r in mine for ms in r["snapshot_ms"]] or [0.0]),
        "failed": sum(r["failed"] for r in mine),
    }


def print_table(closed: dict[str, float], opened: dict[str, float]) -> None:
    print(f"{'dashboard':>9} {'tok/s':>8} {'TPOT ms':>8} {'TTFT ms':>8} {'updates/s':>9} "
          f"{'stream kB/s':>11} {'snapshot ms':>11} {'failed':>6}")
    for name, s in (("closed", closed), ("open", opened)):
        print(f"{name:>9} {s['output_tok_s']:>8.1f} {s['tpot_ms']:>8.1f} {s['ttft_ms']:>8.0f} "
              f"{s['updates_per_s']:>9.2f} {s['stream_kb_per_s']:>11.1f} "
              f"{s['snapshot_ms']:>11.2f} {s['failed']:>6}")
    print(f"open / closed output throughput: {opened['output_tok_s'] / closed['output_tok_s']:.3f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_args(parser)
    parser.set_defaults(input_len=64, output_len=64,
                        api_key=os.environ.get("PAGEDLLM_API_KEY")
                        or os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--num-prompts", type=int, default=32, help="requests per round")
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side")
    add_launch_args(parser, "--kv-cache-memory 512MiB")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with target_server(args) as url:
        rounds = asyncio.run(measure(args, url))
    closed, opened = side(rounds, False), side(rounds, True)
    print_table(closed, opened)
    print(json.dumps({"closed": closed, "open": opened, "rounds": [
        {k: v for k, v in r.items() if k != "errors"} for r in rounds]}))


if __name__ == "__main__":
    main()
