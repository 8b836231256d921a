"""Soak test for `pagedllm serve`: many streaming clients for a long time, watching for leaks.

    python -m benchmarks.soak --launch                      # 64 clients for 30 minutes
    python -m benchmarks.soak --launch --clients 32 --minutes 3 --json soak.json
    python -m benchmarks.soak --url http://127.0.0.1:8000 --server-pid 1234

Run it from the repository root (`-m`: it starts a server with benchmarks/serve_load.py's
launcher). Each client loops until the time is up, each turn sending one of:
- completion / chat: a short prompt streamed back (max_tokens 16-64); the stream must end with
  a finish_reason (not "error") and [DONE];
- cancelled: a stream read for a few chunks, then its connection closed;
- invalid: a request the server must refuse with a 4xx and OpenAI's error body (temperature -1,
  an unknown model, malformed JSON, max_tokens 0).
An error is any 5xx, transport error, other unexpected status, error event or cut-short stream.

Before the clock starts, distinct long prompts go through the whole KV pool once: its pages
become resident only when first written, which would otherwise look like a leak. While the
clients run, it samples the resident memory (VmRSS) of the server process and of its engine-core
and worker processes (pids from /debug/step_stats; the server's is known with --launch, else
--server-pid) and fits a line through the samples after a warm-up: a leak shows as a steady
slope in MB/min. Once the clients have stopped and the server is idle, every KV block must be
free again. TTFT p99 is reported per window of the run, so that a slowdown over time shows.
Prints a summary; `--json PATH` writes the whole report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.serve_load import launch
from pagedllm.bench.dataset import WORDS
from pagedllm.bench.serve import CHAT, COMPLETIONS, chunk_content, error_message, first_model
from pagedllm.bench.stats import summarize

KINDS = ("completion", "chat", "cancelled", "invalid")
KIND_WEIGHTS = (0.35, 0.35, 0.15, 0.15)
PROMPT_WORDS = (4, 24)  # short prompts, in random common words (about a token each)
MAX_TOKENS = (16, 64)
CANCEL_MAX_TOKENS = 128  # with ignore_eos: the cut always comes before the stream's end
CANCEL_AFTER_CHUNKS = (1, 4)
READ_TIMEOUT_S = 120.0  # a stream silent this long is hung: an error, not a wait
PRIME_ROUNDS = 3
PRIME_MAX_WORDS = 512
IDLE_TIMEOUT_S = 60.0  # for the server to finish what is in flight once the clients stop
SETTLE_S = 5.0  # once idle, how long blocks in use may take to show as free
MAX_ERRORS_KEPT = 50


@dataclass(slots=True)
class SoakConfig:
    """How many clients, for how long, and how the memory and TTFT are sampled."""

    clients: int = 64
    minutes: float = 30.0
    warmup_minutes: float | None = None  # RSS before this is left out of the fit; None: 1/3
    sample_s: float = 5.0  # RSS sampling period
    window_s: float = 60.0  # TTFT percentiles per window of this length
    seed: int = 0

    @property
    def warmup_s(self) -> float:
        minutes = self.minutes / 3 if self.warmup_minutes is None else self.warmup_minutes
        return minutes * 60


@dataclass(slots=True)
class Outcome:
    """One request: its kind, when it was sent (seconds into the run), and how it went."""

    kind: str
    sent_s: float
    ttft_s: float | None = None  # to the first content chunk (completion and chat only)
    error: str | None = None


@dataclass(slots=True)
class RssSample:
    at_s: float
    mb: dict[str, float]  # process name -> VmRSS in MB; a process that is gone is left out
    kv_evictions: int | None = None  # prefix-cache evictions so far (None: not known)


class RequestError(Exception):
    """The server answered, but not as it must."""


# ---- the requests -------------------------------------------------------------------------------
def prompt_text(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(*PROMPT_WORDS)))


def stream_body(model: str, chat: bool, rng: random.Random, max_tokens: int,
                **extra: Any) -> dict[str, Any]:
    body = {"model": model, "max_tokens": max_tokens, "stream": True,
            "temperature": rng.choice((0.0, 0.8)), **extra}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt_text(rng)}]
    else:
        body["prompt"] = prompt_text(rng)
    return body


@dataclass(slots=True)
class StreamState:
    chat: bool
    started: float
    ttft_s: float | None = None
    finish_reason: str | None = None
    done: bool = False  # [DONE] came
    chunks: int = 0


def take_chunk(state: StreamState, data: str) -> None:
    chunk = json.loads(data)
    if "error" in chunk:
        raise RequestError(f"error event: {error_message(chunk)}")
    state.chunks += 1
    if state.ttft_s is None and chunk_content(chunk, state.chat):
        state.ttft_s = time.perf_counter() - state.started
    for choice in chunk.get("choices") or []:
        state.finish_reason = choice.get("finish_reason") or state.finish_reason


async def read_stream(response: httpx.Response, state: StreamState,
                      stop_after: int | None = None) -> None:
    """Read SSE events into `state` until [DONE], or until `stop_after` chunks came."""
    async for line in response.aiter_lines():
        data = line[5:].strip() if line.startswith("data:") else ""
        if data == "[DONE]":
            state.done = True
            return
        if data:
            take_chunk(state, data)
            if stop_after is not None and state.chunks >= stop_after:
                return


async def expect_ok(response: httpx.Response) -> None:
    if response.status_code != 200:
        body = (await response.aread()).decode(errors="replace")[:300]
        raise RequestError(f"HTTP {response.status_code}: {body}")


async def send_normal(client: httpx.AsyncClient, model: str, chat: bool,
                      rng: random.Random) -> float | None:
    """One streamed request read to the end; returns its TTFT (None: no content came)."""
    body = stream_body(model, chat, rng, rng.randint(*MAX_TOKENS))
    state = StreamState(chat, time.perf_counter())
    async with client.stream("POST", CHAT if chat else COMPLETIONS, json=body) as response:
        await expect_ok(response)
        await read_stream(response, state)
    if not state.done or state.finish_reason in (None, "error"):
        raise RequestError(f"stream ended after {state.chunks} chunks with finish_reason "
                           f"{state.finish_reason!r}, [DONE] {'seen' if state.done else 'missing'}")
    return state.ttft_s


async def send_cancelled(client: httpx.AsyncClient, model: str, rng: random.Random) -> None:
    """Read a few chunks, then leave: httpx closes a connection whose response is unread."""
    chat = rng.random() < 0.5
    body = stream_body(model, chat, rng, CANCEL_MAX_TOKENS, ignore_eos=True)
    state = StreamState(chat, time.perf_counter())
    async with client.stream("POST", CHAT if chat else COMPLETIONS, json=body) as response:
        await expect_ok(response)
        await read_stream(response, state, stop_after=rng.randint(*CANCEL_AFTER_CHUNKS))


def invalid_requests(model: str) -> dict[str, tuple[str, str]]:
    """name -> (endpoint, raw body) of requests that the server must refuse with a 4xx."""
    prompt = {"model": model, "prompt": "Hello", "max_tokens": 8, "stream": True}
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    return {
        "temperature -1": (COMPLETIONS, json.dumps({**prompt, "temperature": -1})),
        "unknown model": (CHAT, json.dumps({**chat, "model": "no-such-model"})),
        "bad JSON": (CHAT, json.dumps(chat)[:-7]),
        "max_tokens 0": (COMPLETIONS, json.dumps({**prompt, "max_tokens": 0})),
    }


def check_error_body(response: httpx.Response) -> None:
    if not 400 <= response.status_code < 500:
        raise RequestError(f"HTTP {response.status_code}, not a 4xx: {response.text[:300]}")
    try:
        error = response.json()["error"]
        ok = isinstance(error["message"], str) and isinstance(error["type"], str)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise RequestError(f"HTTP {response.status_code} without OpenAI's error body: "
                           f"{response.text[:300]}")


async def send_invalid(client: httpx.AsyncClient, model: str, rng: random.Random) -> None:
    name, (endpoint, content) = rng.choice(sorted(invalid_requests(model).items()))
    response = await client.post(endpoint, content=content,
                                 headers={"Content-Type": "application/json"})
    try:
        check_error_body(response)
    except RequestError as exc:
        raise RequestError(f"{name}: {exc}") from None


# ---- the clients --------------------------------------------------------------------------------
@dataclass(slots=True)
class Load:
    """What every client shares: the connection pool, the model, the clock and the results."""

    client: httpx.AsyncClient
    model: str
    started: float  # time.monotonic() at the start
    deadline: float
    outcomes: list[Outcome] = field(default_factory=list)
    ended_s: float = 0.0  # when the last client stopped

    def now_s(self) -> float:
        return time.monotonic() - self.started


def sender(load: Load, kind: str, rng: random.Random) -> Awaitable[float | None]:
    if kind in ("completion", "chat"):
        return send_normal(load.client, load.model, kind == "chat", rng)
    if kind == "cancelled":
        return send_cancelled(load.client, load.model, rng)
    return send_invalid(load.client, load.model, rng)


async def one_request(load: Load, kind: str, rng: random.Random) -> Outcome:
    outcome = Outcome(kind, load.now_s())
    try:
        outcome.ttft_s = await sender(load, kind, rng)
    except RequestError as exc:
        outcome.error = str(exc)
    except Exception as exc:  # transport, timeout, a chunk that is not JSON: all errors
        outcome.error = f"{type(exc).__name__}: {exc}"
    return outcome


async def client_loop(load: Load, rng: random.Random, first: str) -> None:
    """Requests one after another until the deadline: `first`, then kinds drawn at random."""
    kind = first
    while time.monotonic() < load.deadline:
        load.outcomes.append(await one_request(load, kind, rng))
        kind = rng.choices(KINDS, KIND_WEIGHTS)[0]


# ---- the server: its processes' memory and its KV blocks ----------------------------------------
def read_rss_mb(pid: int) -> float | None:
    """VmRSS of a local process, in MB; None if it is gone or not on this machine."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


async def step_stats(client: httpx.AsyncClient) -> dict[str, Any]:
    """pagedllm's engine counters, without the step records (`since` past the last step)."""
    response = await client.get("/debug/step_stats", params={"since": 10**12})
    response.raise_for_status()
    return response.json()


async def server_pids(client: httpx.AsyncClient, server_pid: int | None) -> dict[str, int]:
    """Name -> pid of every process of the server that this machine can see."""
    stats = await step_stats(client)
    pids = {"server": server_pid, "engine core": stats.get("engine_core_pid")}
    pids |= {f"worker {i}": pid for i, pid in enumerate(stats.get("worker_pids") or ())}
    return {name: pid for name, pid in pids.items() if pid and read_rss_mb(pid) is not None}


async def kv_evictions(client: httpx.AsyncClient) -> int | None:
    try:
        return (await step_stats(client))["kv_cache"]["num_evictions"]
    except (httpx.HTTPError, KeyError, TypeError):
        return None


async def sample_rss(load: Load, pids: dict[str, int]) -> RssSample:
    sizes = {name: read_rss_mb(pid) for name, pid in pids.items()}
    sample = RssSample(load.now_s(), {name: mb for name, mb in sizes.items() if mb is not None})
    sample.kv_evictions = await kv_evictions(load.client)
    return sample


async def watch_rss(load: Load, pids: dict[str, int], period_s: float,
                    samples: list[RssSample]) -> None:
    """Sample every `period_s` until the deadline (the caller cancels it at the end anyway)."""
    while True:
        samples.append(await sample_rss(load, pids))
        if time.monotonic() >= load.deadline:
            return
        await asyncio.sleep(min(period_s, max(load.deadline - time.monotonic(), 0.01)))


def blocks_in_use(stats: dict[str, Any]) -> int:
    return stats["num_blocks"] - stats["num_free_blocks"]


async def idle_stats(client: httpx.AsyncClient) -> dict[str, Any]:
    """/debug/step_stats once no request runs or waits. Aborts of cancelled streams land a
    moment after their disconnect, so blocks in use get SETTLE_S to reach 0; whatever is left
    after that is reported as it is. A RequestError if the server never goes idle."""
    deadline, idle_since = time.monotonic() + IDLE_TIMEOUT_S, None
    while True:
        stats = await step_stats(client)
        in_use = blocks_in_use(stats)
        busy = stats["num_running"] + stats["num_waiting"]
        now = time.monotonic()
        idle_since = None if busy else (idle_since or now)
        if idle_since is not None and (in_use == 0 or now - idle_since >= SETTLE_S):
            return stats
        if now > deadline:
            raise RequestError(f"not idle {IDLE_TIMEOUT_S:.0f} s after the clients stopped: "
                               f"{stats['num_running']} running, {stats['num_waiting']} waiting, "
                               f"{in_use} blocks in use")
        await asyncio.sleep(0.5)


# ---- before the clock starts: go through the KV pool once ----------------------------------------
async def prime_request(client: httpx.AsyncClient, model: str, words: int,
                        rng: random.Random) -> None:
    body = {"model": model, "prompt": " ".join(rng.choices(WORDS, k=words)), "max_tokens": 1}
    response = await client.post(COMPLETIONS, json=body)
    if response.status_code != 200:
        raise RequestError(f"priming request: HTTP {response.status_code}: {response.text[:300]}")


async def max_model_len(client: httpx.AsyncClient) -> int:
    models = (await client.get("/v1/models")).json()["data"]
    return int(models[0].get("max_model_len") or 2048)


async def prime_kv_pool(client: httpx.AsyncClient, model: str, clients: int,
                        rng: random.Random) -> None:
    """Send distinct long prompts (max_tokens 1) whose tokens add up to the KV pool, until the
    pool has been gone through (see kv_pool_cycled_s), so that first writes to the pool do not
    show in the RSS slope."""
    kv = (await step_stats(client))["kv_cache"]
    words = min(await max_model_len(client) // 2, PRIME_MAX_WORDS)
    count = -(-kv["num_blocks"] * kv["block_size"] // words)
    limit = asyncio.Semaphore(clients)

    async def one() -> None:
        async with limit:
            await prime_request(client, model, words, rng)

    for _ in range(PRIME_ROUNDS):
        if await kv_evictions(client):
            return
        await asyncio.gather(*(one() for _ in range(count)))


# ---- the report -------------------------------------------------------------------------------
def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB per minute; None under 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in points)
    if var_t == 0:
        return None
    cov = sum((t - mean_t) * (y - mean_y) for t, y in points)
    return cov / var_t * 60


def kv_pool_cycled_s(samples: list[RssSample]) -> float | None:
    """When every KV block had been written at least once (None: not seen).

    The KV pool comes from mmap and its pages become resident on first write, so the engine
    core's RSS grows by up to the whole pool while new blocks are first used: not a leak, but
    it looks like one. The free queue hands out never-used blocks before any freed one, and
    reusing a freed block that holds a cached prefix counts an eviction: the first eviction
    therefore means the pool has been gone through once."""
    return next((s.at_s for s in samples if s.kv_evictions), None)


def fit_start_s(samples: list[RssSample], warmup_s: float) -> float:
    """The RSS fit starts after the warm-up, and not before the KV pool was gone through (the
    priming has normally done that before the first sample)."""
    return max(warmup_s, kv_pool_cycled_s(samples) or 0.0)


def rss_summary(samples: list[RssSample], fit_from_s: float) -> dict[str, dict[str, Any]]:
    """Per process (and all of them together): first, last and largest MB, and the slope of
    the samples from `fit_from_s` on."""
    names = list(dict.fromkeys(name for s in samples for name in s.mb))
    series = {name: [(s.at_s, s.mb[name]) for s in samples if name in s.mb] for name in names}
    if len(names) > 1:
        series["total"] = [(s.at_s, sum(s.mb.values())) for s in samples if len(s.mb) == len(names)]
    return {name: {"first_mb": points[0][1], "last_mb": points[-1][1],
                   "max_mb": max(y for _, y in points),
                   "slope_mb_per_min": slope_per_min([p for p in points if p[0] >= fit_from_s])}
            for name, points in series.items() if points}


def add_per_request(rss: dict[str, dict[str, Any]], requests_per_min: float) -> None:
    """The slope as KB per request sent: what a leak of so much per request would show."""
    for entry in rss.values():
        slope = entry["slope_mb_per_min"]
        entry["kb_per_request"] = None if slope is None else slope * 1024 / requests_per_min


def ttft_windows(outcomes: list[Outcome], window_s: float) -> list[dict[str, Any]]:
    """TTFT of the successful streams, by the window in which each was sent."""
    windows: dict[int, list[float]] = {}
    for o in outcomes:
        if o.ttft_s is not None and o.error is None:
            windows.setdefault(int(o.sent_s // window_s), []).append(o.ttft_s)
    rows = []
    for index, values in sorted(windows.items()):
        summary = summarize(values)
        rows.append({"start_s": index * window_s, "count": summary.count,
                     "p50_s": summary.p50, "p99_s": summary.p99})
    return rows


@dataclass(slots=True)
class SoakReport:
    config: SoakConfig
    duration_s: float  # from the first request to the end of the last
    requests: dict[str, int]  # kind -> number sent
    errors: dict[str, int]  # kind -> number that failed
    error_examples: list[str]  # the first MAX_ERRORS_KEPT, "kind at N s: message"
    rss: dict[str, dict[str, Any]]
    kv_pool_cycled_s: float | None  # see kv_pool_cycled_s()
    rss_fit_from_s: float
    kv_blocks_in_use_idle: int | None  # None when the server never went idle (an error)
    num_blocks: int | None
    engine_steps: int | None  # steps the engine ran from the first request to idle
    ttft_windows: list[dict[str, Any]]
    rss_samples: list[RssSample]

    @property
    def num_errors(self) -> int:
        return sum(self.errors.values())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "num_errors": self.num_errors}


def build_report(config: SoakConfig, load: Load, samples: list[RssSample], steps_before: int,
                 idle: dict[str, Any] | None, idle_error: str | None) -> SoakReport:
    outcomes = load.outcomes
    failed = [o for o in outcomes if o.error is not None]
    examples = [f"{o.kind} at {o.sent_s:.1f} s: {o.error}" for o in failed][:MAX_ERRORS_KEPT]
    errors = dict(Counter(o.kind for o in failed))
    if idle_error is not None:
        errors["idle"] = 1
        examples.append(idle_error)
    in_use, num_blocks, steps = (None, None, None) if idle is None else (
        blocks_in_use(idle), idle["num_blocks"], idle["num_steps"] - steps_before)
    fit_from_s = fit_start_s(samples, config.warmup_s)
    rss = rss_summary(samples, fit_from_s)
    add_per_request(rss, len(outcomes) / max(load.ended_s / 60, 1e-9))
    return SoakReport(config, load.ended_s, dict(Counter(o.kind for o in outcomes)), errors,
                      examples, rss, kv_pool_cycled_s(samples),
                      fit_from_s, in_use, num_blocks, steps, ttft_windows(outcomes, config.window_s),
                      samples)


# ---- the run --------------------------------------------------------------------------------------
def make_client(base_url: str, api_key: str | None, clients: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    root = base_url.rstrip("/").removesuffix("/v1")
    return httpx.AsyncClient(base_url=root, headers=headers, limits=limits,
                             timeout=httpx.Timeout(READ_TIMEOUT_S, connect=30.0))


async def run_load(load: Load, config: SoakConfig, pids: dict[str, int],
                   samples: list[RssSample]) -> None:
    watcher = asyncio.create_task(watch_rss(load, pids, config.sample_s, samples))
    # The clients start with every kind in turn, so that even a short run sends each kind.
    await asyncio.gather(*(client_loop(load, random.Random(config.seed * 100_003 + i),
                                       KINDS[i % len(KINDS)]) for i in range(config.clients)))
    load.ended_s = load.now_s()
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)


async def run_soak(base_url: str, config: SoakConfig, api_key: str | None = None,
                   server_pid: int | None = None) -> SoakReport:
    """Run the soak against a server that is up; `server_pid` (when local) adds its RSS."""
    async with make_client(base_url, api_key, config.clients) as client:
        model = await first_model(client)
        pids = await server_pids(client, server_pid)
        await prime_kv_pool(client, model, config.clients, random.Random(config.seed - 1))
        steps_before = (await step_stats(client))["num_steps"]
        started = time.monotonic()
        load = Load(client, model, started, started + config.minutes * 60)
        samples: list[RssSample] = []
        await run_load(load, config, pids, samples)
        idle, idle_error = None, None
        try:
            idle = await idle_stats(client)
        except (RequestError, httpx.HTTPError) as exc:
            idle_error = f"after the load: {type(exc).__name__}: {exc}"
        return build_report(config, load, samples, steps_before, idle, idle_error)


# ---- the summary --------------------------------------------------------------------------------
def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_summary(report: SoakReport) -> None:
    print_requests(report)
    print_rss(report)
    print(f"{'window':>8} {'streams':>8} {'p50 TTFT s':>10} {'p99 TTFT s':>10}")
    for row in report.ttft_windows:
        print(f"{row['start_s'] / 60:>6.1f} m {row['count']:>8} {row['p50_s']:>10.3f} "
              f"{row['p99_s']:>10.3f}")


def print_requests(report: SoakReport) -> None:
    sent = sum(report.requests.values())
    print(f"soak: {report.config.clients} clients, {report.duration_s / 60:.1f} min")
    print(f"requests: {sent} ({', '.join(f'{k} {report.requests.get(k, 0)}' for k in KINDS)}), "
          f"{sent / max(report.duration_s, 1e-9) * 60:.0f}/min")
    print(f"errors: {report.num_errors} {report.errors or ''}")
    for example in report.error_examples[:10]:
        print(f"  {example}")
    print(f"KV blocks in use when idle: {fmt(report.kv_blocks_in_use_idle, 'd')} "
          f"of {fmt(report.num_blocks, 'd')}; engine steps: {fmt(report.engine_steps, 'd')}")


def print_rss(report: SoakReport) -> None:
    cycled = report.kv_pool_cycled_s
    print(f"RSS slope from {report.rss_fit_from_s / 60:.1f} min (warm-up "
          f"{report.config.warmup_s / 60:.1f} min; every KV block used by "
          f"{'-' if cycled is None else f'{cycled / 60:.1f}'} min)")
    if cycled is None:
        print("  no prefix-cache eviction seen (prefix caching off?): the engine core's slope "
              "may include first writes to the KV pool")
    print(f"{'process':<12} {'first MB':>9} {'last MB':>9} {'max MB':>9} {'MB/min':>8} "
          f"{'KB/request':>10}")
    for name, rss in report.rss.items():
        print(f"{name:<12} {rss['first_mb']:>9.1f} {rss['last_mb']:>9.1f} {rss['max_mb']:>9.1f} "
              f"{fmt(rss['slope_mb_per_min'], '.3f'):>8} {fmt(rss['kb_per_request'], '.1f'):>10}")


# ---- the command --------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SoakConfig()
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--minutes", type=float, default=defaults.minutes)
    parser.add_argument("--warmup-minutes", type=float, default=None,
                        help="left out of the RSS fit (default: the first third of the run)")
    parser.add_argument("--sample-s", type=float, default=defaults.sample_s,
                        help="RSS sampling period")
    parser.add_argument("--window-s", type=float, default=defaults.window_s,
                        help="TTFT percentiles per window of this many seconds")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--server-pid", type=int, default=None,
                        help="the server's pid, for its RSS, when it runs here (set by --launch)")
    parser.add_argument("--launch", action="store_true", help="start a server for the run")
    parser.add_argument("--server-args", default="--kv-cache-memory 1GiB",
                        help="extra `pagedllm serve` arguments with --launch")
    parser.add_argument("--json", default=None, help="write the whole report here")
    return parser.parse_args()


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> int:
    args = parse_args()
    config = SoakConfig(args.clients, args.minutes, args.warmup_minutes, args.sample_s,
                        args.window_s, args.seed)
    proc, url = launch(args.server_args.split()) if args.launch else (None, args.url)
    pid = proc.pid if proc is not None else args.server_pid
    try:
        report = asyncio.run(run_soak(url, config, None if proc else args.api_key, pid))
    finally:
        if proc is not None:
            stop(proc)
    print_summary(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_dict(), indent=1))
    return 1 if report.num_errors or report.kv_blocks_in_use_idle else 0


if __name__ == "__main__":
    raise SystemExit(main())
