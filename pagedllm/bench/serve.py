"""Online serving load against any OpenAI-compatible server, over HTTP only (httpx).

Requests go out on a Poisson schedule (`--request-rate` per second; inf sends them all at once),
at most `--max-concurrency` in flight, every one streamed with usage. Per request it measures
the time to first token (TTFT), the gaps between content chunks (ITL), the time per output token
after the first (TPOT = (e2e - TTFT) / (output tokens - 1)) and the end-to-end time. Output
tokens come from the server's usage chunk (counted chunks when there is none). A request that
fails is recorded with its error; the run goes on.

Nothing here knows pagedllm: the same command measures vLLM, SGLang or a hosted API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedllm.bench.dataset import (
    WorkItem,
    load_dataset,
    require_text,
    synthetic_text_workload,
)
from pagedllm.bench.stats import summary_dict

if TYPE_CHECKING:  # httpx is needed only to run, not to build the `pagedllm` parser
    import httpx

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
DEFAULT_NUM_PROMPTS = 64
REQUEST_TIMEOUT_S = 600.0  # per read: a long prefill under load may keep the first chunk back
CONNECT_TIMEOUT_S = 30.0


class RequestFailed(Exception):
    """The server answered, but with an error (a status, or an error event in the stream)."""


@dataclass(slots=True)
class LoadSpec:
    """How to send the requests: where, as which model, how fast and how many at once."""

    model: str
    endpoint: str = COMPLETIONS
    request_rate: float = math.inf  # requests per second, Poisson arrivals
    max_concurrency: int | None = None
    ignore_eos: bool = True
    seed: int = 0


@dataclass(slots=True)
class RequestResult:
    index: int  # in the workload
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None  # None when no content came (an error, or an empty completion)
    itl_s: list[float] = field(default_factory=list)  # gaps between successive content chunks
    e2e_s: float = 0.0
    prompt_tokens: int = 0  # from usage (0 when the server sends none)
    output_tokens: int = 0

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


# ---- one request ------------------------------------------------------------------------------
def request_body(spec: LoadSpec, item: WorkItem) -> dict[str, Any]:
    body: dict[str, Any] = {"model": spec.model, "max_tokens": item.output_len,
                            "temperature": 0.0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if spec.endpoint == CHAT:
        body["messages"] = [{"role": "user", "content": item.prompt}]
    else:
        body["prompt"] = item.prompt
    if spec.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extra field; others may reject it (--no-ignore-eos)
    return body


async def send_request(client: httpx.AsyncClient, spec: LoadSpec, item: WorkItem,
                       index: int) -> RequestResult:
    result = RequestResult(index)
    started = time.perf_counter()
    try:
        async with client.stream("POST", spec.endpoint, json=request_body(spec, item)) as response:
            if response.status_code != 200:
                raise RequestFailed(await error_text(response))
            await read_stream(response, spec.endpoint == CHAT, result, started)
        result.ok = True
    except Exception as exc:  # any failure is this request's result, never the end of the run
        result.error = str(exc) if isinstance(exc, RequestFailed) else f"{type(exc).__name__}: {exc}"
    result.e2e_s = time.perf_counter() - started
    return result


async def read_stream(response: httpx.Response, chat: bool, result: RequestResult,
                      started: float) -> None:
    """Time every content chunk of an SSE stream into `result`; take the usage if it comes."""
    last: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    async for line in response.aiter_lines():
        data = line[5:].strip() if line.startswith("data:") else None
        if not data:
            continue
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RequestFailed(f"error in stream: {error_message(chunk)}")
        if chunk.get("usage"):
            result.prompt_tokens = chunk["usage"].get("prompt_tokens") or 0
            usage_tokens = chunk["usage"].get("completion_tokens")
        if chunk_content(chunk, chat):
            now = time.perf_counter()
            if last is None:
                result.ttft_s = now - started
            else:
                result.itl_s.append(now - last)
            last, chunks = now, chunks + 1
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks


def chunk_content(chunk: dict[str, Any], chat: bool) -> str:
    """The generated text a chunk carries ("" for role, finish and usage chunks)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if not chat:
        return choices[0].get("text") or ""
    delta = choices[0].get("delta") or {}
    return delta.get("content") or delta.get("reasoning_content") or ""  # reasoning is output


async def error_text(response: httpx.Response) -> str:
    body = (await response.aread()).decode(errors="replace")
    try:
        message = error_message(json.loads(body))
    except ValueError:
        message = body[:500]
    return f"HTTP {response.status_code}: {message}"


def error_message(body: Any) -> str:
    """OpenAI's {"error": {"message": ...}}, or whatever else the server said."""
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return str(error)[:500]


# ---- the load -----------------------------------------------------------------------------------
def arrival_offsets(num_requests: int, request_rate: float, rng: random.Random) -> list[float]:
    """Send times from the start: a Poisson process, i.e. exponential gaps of mean 1/rate (the
    first request at 0); all at 0 for an infinite rate."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    offsets, now = [], 0.0
    for _ in range(num_requests):
        offsets.append(now)
        now += rng.expovariate(request_rate)
    return offsets


async def run_load(client: httpx.AsyncClient, spec: LoadSpec,
                   work: list[WorkItem]) -> tuple[list[RequestResult], float]:
    """Send every item on schedule; returns the results (in workload order) and the seconds
    from the first send to the last answer."""
    offsets = arrival_offsets(len(work), spec.request_rate, random.Random(spec.seed))
    limit = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None

    async def send(index: int, item: WorkItem) -> RequestResult:
        if limit is None:
            return await send_request(client, spec, item, index)
        async with limit:  # the clock starts once it is sent, not while it waits here
            return await send_request(client, spec, item, index)

    started = time.perf_counter()
    tasks = []
    for index, (item, offset) in enumerate(zip(work, offsets)):
        await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
        tasks.append(asyncio.create_task(send(index, item)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - started


def serve_report(results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    """Counts, throughputs and latency summaries (ms) over the completed requests."""
    done = [r for r in results if r.ok]
    prompt_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "num_prompts": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration_s,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration_s,
        "ttft_ms": summary_dict([r.ttft_s * 1e3 for r in done if r.ttft_s is not None]),
        "tpot_ms": summary_dict([r.tpot_s * 1e3 for r in done if r.tpot_s is not None]),
        "itl_ms": summary_dict([gap * 1e3 for r in done for gap in r.itl_s]),
        "e2e_ms": summary_dict([r.e2e_s * 1e3 for r in done]),
        "errors": [{"index": r.index, "error": r.error} for r in results if not r.ok],
    }


async def benchmark(client: httpx.AsyncClient, spec: LoadSpec,
                    work: list[WorkItem]) -> dict[str, Any]:
    results, duration = await run_load(client, spec, work)
    return serve_report(results, duration)


# ---- the server -------------------------------------------------------------------------------
def make_client(base_url: str, api_key: str | None, max_connections: int) -> httpx.AsyncClient:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # As many connections as requests may be in flight: a request queued in httpx's pool
    # would have its clock running before it is sent.
    limits = httpx.Limits(max_connections=max_connections,
                          max_keepalive_connections=max_connections)
    # OpenAI clients' base URLs end in /v1; the endpoints here carry it themselves.
    root = base_url.rstrip("/").removesuffix("/v1")
    return httpx.AsyncClient(base_url=root, headers=headers, limits=limits,
                             timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))


async def first_model(client: httpx.AsyncClient) -> str:
    """The first model the server lists; a ValueError (a clean CLI error) if there is none."""
    import httpx

    try:
        response = await client.get("/v1/models")
    except httpx.TransportError as exc:
        raise ValueError(f"cannot reach {client.base_url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise ValueError(f"GET /v1/models: HTTP {response.status_code}: "
                         f"{error_message(_json_or_text(response))}")
    models = response.json().get("data") or []
    if not models:
        raise ValueError("the server lists no model at /v1/models: pass --model")
    return models[0]["id"]


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


# ---- the command ------------------------------------------------------------------------------
def add_load_args(parser: argparse.ArgumentParser) -> None:
    """Where to send and what: shared with benchmarks/serve_load.py."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--endpoint", choices=[COMPLETIONS, CHAT], default=COMPLETIONS)
    parser.add_argument("--model", default=None, help="default: the first id of GET /v1/models")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="bearer token (default: $OPENAI_API_KEY)")
    parser.add_argument("--input-len", type=int, default=200,
                        help="synthetic prompt length, in random words (about one token each)")
    parser.add_argument("--output-len", type=int, default=128, help="synthetic output length")
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="synthetic lengths vary uniformly by this fraction either way")
    parser.add_argument("--seed", type=int, default=0, help="prompts and arrival times")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="send vLLM's ignore_eos so every request makes its output length "
                             "(--no-ignore-eos for servers that reject unknown fields)")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="load an OpenAI-compatible server over HTTP")
    add_load_args(parser)
    parser.add_argument("--num-prompts", type=int, default=None,
                        help=f"requests to send (default: {DEFAULT_NUM_PROMPTS}, or the whole "
                             "--dataset)")
    parser.add_argument("--dataset", default=None,
                        help="JSONL file of {prompt, output_len} per line (default: random words)")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second, Poisson arrivals (default inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="most requests in flight (default: no limit)")
    parser.add_argument("--output-json", default=None)
    parser.set_defaults(handler=main)


def build_workload(args: argparse.Namespace) -> list[WorkItem]:
    if args.dataset:
        return require_text(load_dataset(args.dataset, args.num_prompts))
    return synthetic_text_workload(args.num_prompts or DEFAULT_NUM_PROMPTS, args.input_len,
                                   args.output_len, args.range_ratio, args.seed)


def check_args(args: argparse.Namespace) -> None:
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be positive (inf: all at once), got "
                         f"{args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")


async def run(args: argparse.Namespace, work: list[WorkItem]) -> dict[str, Any]:
    async with make_client(args.base_url, args.api_key,
                           args.max_concurrency or len(work)) as client:
        model = args.model or await first_model(client)
        spec = LoadSpec(model, args.endpoint, args.request_rate, args.max_concurrency,
                        args.ignore_eos, args.seed)
        report = await benchmark(client, spec, work)
    config = {k: v for k, v in vars(args).items() if k not in ("handler", "api_key")}
    if math.isinf(args.request_rate):
        config["request_rate"] = "inf"  # JSON has no infinity; strict parsers reject Infinity
    return {"config": config, "model": model, **report}


def main(args: argparse.Namespace) -> int:
    try:
        import httpx  # noqa: F401  (an optional dependency: say how to get it)
    except ImportError:
        raise ValueError("bench serve needs httpx: pip install 'pagedllm[bench]'") from None
    check_args(args)
    work = build_workload(args)
    report = asyncio.run(run(args, work))
    print_table(report)
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


def print_table(report: dict[str, Any]) -> None:
    duration = report["duration_s"]
    print(f"{report['completed']} completed, {report['failed']} failed in {duration:.2f} s: "
          f"{report['request_throughput']:.2f} req/s, {report['output_throughput']:.1f} output "
          f"tok/s, {report['total_token_throughput']:.1f} total tok/s")
    print(f"{'ms':<6}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}")
    for label, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"),
                       ("E2E", "e2e_ms")):
        s = report[key]
        if s is None:
            print(f"{label:<6}{'-':>10}")
            continue
        print(f"{label:<6}{s['mean']:>10.1f}{s['p50']:>10.1f}{s['p90']:>10.1f}{s['p99']:>10.1f}")
    for error in report["errors"][:5]:
        print(f"request {error['index']} failed: {error['error']}")
    if len(report["errors"]) > 5:
        print(f"... and {len(report['errors']) - 5} more failures (all in --output-json)")
