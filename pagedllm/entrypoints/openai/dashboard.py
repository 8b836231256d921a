"""GET /dashboard: a live page of the paged KV cache, the queues and the throughput.

    GET /dashboard                 the page (static/dashboard.html + .js); no data in it, so it
    GET /dashboard/dashboard.js    loads without the API key
    GET /dashboard/stream          server-sent events, behind --api-key like /v1: one "history"
                                   event, then an "update" event UPDATE_INTERVAL_S apart

One sampler task per server, alive only while a stream is open: each tick it asks the engine
for a snapshot (core/snapshot.py; taken between two steps, in the engine core's own process
when it has one), turns it into one JSON message and hands the same text to every open stream.
A client that cannot keep up loses old updates, never holds the sampler back.

An update is compact whatever the cache's size: the block states are one byte per block
(base64), hashes four bytes per block (base64), and the owners are the requests' block tables
as runs `[first, length, first, length, ...]`; the page inverts them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from pagedllm.bench.stats import percentile
from pagedllm.core.snapshot import STATE_NAMES, EngineSnapshot, RequestView
from pagedllm.engine.async_llm import AsyncLLM, RequestStats
from pagedllm.engine.errors import EngineDeadError
from pagedllm.entrypoints.openai.streaming import sse_response
from pagedllm.logger import init_logger

logger = init_logger(__name__)

PAGE_PATHS = ("/dashboard", "/dashboard/dashboard.js")  # open: the page holds no data
UPDATE_INTERVAL_S = 0.33  # about 3 updates a second
# At most this fraction of the step loop's time goes to snapshots: with a huge cache, whose
# snapshot takes longer, updates come less often (a 5 ms snapshot: one a second).
MAX_SNAPSHOT_SHARE = 0.005
HISTORY_S = 300.0  # the time series a new page starts with
LATENCY_WINDOW_S = 60.0  # TTFT and inter-token percentiles: requests finished this recently
MAX_LATENCIES = 20_000  # finished requests kept for those percentiles
MAX_REQUESTS = 256  # listed per update (the counts still say how many there are)
SNAPSHOT_TIMEOUT_S = 10.0  # a core that answers no snapshot this long: report, try again
CLIENT_BACKLOG = 2  # updates queued per stream; older ones are dropped for a slow client

router = APIRouter(include_in_schema=False)


# ---- encoding -------------------------------------------------------------------------------------
def block_runs(block_ids: list[int]) -> list[int]:
    """A block table as runs of consecutive ids, flat: [first, length, first, length, ...]."""
    runs: list[int] = []
    for block_id in block_ids:
        if runs and runs[-2] + runs[-1] == block_id:
            runs[-1] += 1
        else:
            runs += [block_id, 1]
    return runs


def expand_runs(runs: list[int]) -> list[int]:
    """The inverse of block_runs (what the page does)."""
    return [first + i for first, length in zip(runs[::2], runs[1::2]) for i in range(length)]


def request_entry(view: RequestView) -> dict[str, Any]:
    return {"id": view.request_id, "state": view.state, "prompt": view.num_prompt_tokens,
            "computed": view.num_computed_tokens, "output": view.num_output_tokens,
            "cached": view.num_cached_tokens, "age": round(view.age_s, 2),
            "blocks": block_runs(view.block_ids)}


def update_message(snapshot: EngineSnapshot, sample: dict[str, Any],
                   max_requests: int = MAX_REQUESTS) -> dict[str, Any]:
    """One update, as the page reads it (docs/dashboard.md describes the fields)."""
    kv = snapshot.kv_cache
    return {
        "step": snapshot.num_steps,
        "states": STATE_NAMES,
        "num_blocks": kv.num_blocks,
        "block_size": kv.block_size,
        "blocks": base64.b64encode(snapshot.block_states).decode(),
        "hashes": base64.b64encode(snapshot.block_hashes).decode(),
        "requests": [request_entry(v) for v in snapshot.requests[:max_requests]],
        "num_requests": len(snapshot.requests),
        "running": snapshot.num_running,
        "waiting": snapshot.num_waiting,
        "swapped": kv.num_swapped_requests,
        "kv": kv.as_dict(),
        "snapshot_ms": round(snapshot.cost_s * 1e3, 3),  # what it held the step loop up
        "sample": sample,
    }


# ---- the time series ------------------------------------------------------------------------------
@dataclass(slots=True)
class Latency:
    finished_at: float  # time.monotonic()
    ttft_s: float
    itl_s: float | None  # mean time between its output tokens (None: fewer than two)


class LatencyWindow:
    """TTFT and inter-token latency of recently finished requests. `observe` runs on the engine
    thread (an AsyncLLM observer); a deque's append and a copy of it are safe across threads."""

    def __init__(self, window_s: float = LATENCY_WINDOW_S) -> None:
        self.window_s = window_s
        self.recent: deque[Latency] = deque(maxlen=MAX_LATENCIES)

    def observe(self, stats: RequestStats) -> None:
        if stats.first_token_time is None:
            return
        itl = None
        if stats.num_generation_tokens > 1:
            itl = ((stats.finished_time - stats.first_token_time)
                   / (stats.num_generation_tokens - 1))
        self.recent.append(Latency(stats.finished_time, stats.first_token_time
                                   - stats.arrival_time, itl))

    def percentiles(self, now: float) -> dict[str, float | None]:
        recent = [x for x in list(self.recent) if now - x.finished_at <= self.window_s]
        ttft = sorted(x.ttft_s for x in recent)
        itl = sorted(x.itl_s for x in recent if x.itl_s is not None)
        return {f"{name}_p{q}": (percentile(values, q) if values else None)
                for name, values in (("ttft", ttft), ("itl", itl)) for q in (50, 90, 99)}


def sample(snapshot: EngineSnapshot, previous: EngineSnapshot | None,
           latencies: LatencyWindow) -> dict[str, Any]:
    """One point of every chart: rates since the previous snapshot, levels now."""
    kv = snapshot.kv_cache
    point: dict[str, Any] = {
        "t": round(time.time(), 3), "running": snapshot.num_running,
        "waiting": snapshot.num_waiting, "swapped": kv.num_swapped_requests,
        "kv_usage": kv.usage, "output_tps": None, "prompt_tps": None, "hit_rate": None,
        **latencies.percentiles(snapshot.taken_at)}
    if previous is not None and snapshot.taken_at > previous.taken_at:
        elapsed = snapshot.taken_at - previous.taken_at
        point["output_tps"] = (snapshot.num_output_tokens - previous.num_output_tokens) / elapsed
        point["prompt_tps"] = (snapshot.num_prompt_tokens - previous.num_prompt_tokens) / elapsed
        queries = kv.prefix_cache_queries - previous.kv_cache.prefix_cache_queries
        if queries > 0:
            point["hit_rate"] = (kv.prefix_cache_hits
                                 - previous.kv_cache.prefix_cache_hits) / queries
    return {k: _finite(v) for k, v in point.items()}


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ---- the hub --------------------------------------------------------------------------------------
class DashboardHub:
    """The sampler and its listeners. Everything but LatencyWindow.observe runs on the event
    loop."""

    def __init__(self, engine: AsyncLLM, interval_s: float = UPDATE_INTERVAL_S) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.latencies = LatencyWindow()
        self.history: deque[dict[str, Any]] = deque(maxlen=int(HISTORY_S / interval_s))
        self.listeners: set[asyncio.Queue[str]] = set()
        self.previous: EngineSnapshot | None = None
        self.num_updates = 0
        self._sampler: asyncio.Task | None = None
        engine.add_observer(self.latencies.observe)

    async def events(self) -> AsyncIterator[str]:
        """One client's server-sent events, until it goes away (Starlette cancels us then)."""
        queue: asyncio.Queue[str] = asyncio.Queue(CLIENT_BACKLOG)
        self.listeners.add(queue)
        if self._sampler is None or self._sampler.done():
            self.previous = None  # rates never span a time nobody watched
            self._sampler = asyncio.create_task(self._sample_while_watched())
        try:
            yield f"event: history\ndata: {json.dumps(list(self.history))}\n\n"
            while True:
                yield await queue.get()
        finally:
            self.listeners.discard(queue)
            if not self.listeners and self._sampler is not None:
                self._sampler.cancel()
                self._sampler = None

    async def _sample_while_watched(self) -> None:
        loop = asyncio.get_running_loop()
        while self.listeners:
            started = loop.time()
            event, cost_s = await self._next_event()
            self._broadcast(event)
            period = max(self.interval_s, cost_s / MAX_SNAPSHOT_SHARE)
            await asyncio.sleep(max(0.0, period - (loop.time() - started)))

    async def _next_event(self) -> tuple[str, float]:
        """The next event and how long the engine spent on its snapshot."""
        try:
            snapshot = await asyncio.wait_for(self.engine.snapshot(), SNAPSHOT_TIMEOUT_S)
        except (EngineDeadError, asyncio.TimeoutError) as exc:
            message = str(exc) or f"no snapshot from the engine in {SNAPSHOT_TIMEOUT_S:.0f} s"
            return _error_event(message), 0.0
        except Exception as exc:  # a bug here must not silence every page for good
            logger.exception("dashboard snapshot failed")
            return _error_event(f"{type(exc).__name__}: {exc}"), 0.0
        point = sample(snapshot, self.previous, self.latencies)
        self.previous = snapshot
        self.history.append(point)
        self.num_updates += 1
        message = json.dumps(update_message(snapshot, point))
        return f"event: update\ndata: {message}\n\n", snapshot.cost_s

    def _broadcast(self, event: str) -> None:
        for queue in self.listeners:
            if queue.full():  # a slow client: it gets the newest, not a growing backlog
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)


def _error_event(message: str) -> str:
    return f"event: engine_error\ndata: {json.dumps({'message': message})}\n\n"


# ---- routes -----------------------------------------------------------------------------------------
def _static(name: str) -> str:
    return resources.files("pagedllm.entrypoints.openai").joinpath("static", name).read_text()


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard_page() -> HTMLResponse:
    return HTMLResponse(_static("dashboard.html"), headers={"Cache-Control": "no-cache"})


@router.get("/dashboard/dashboard.js")
async def dashboard_script() -> Response:
    return Response(_static("dashboard.js"), media_type="text/javascript",
                    headers={"Cache-Control": "no-cache"})


@router.get("/dashboard/stream")
async def dashboard_stream(request: Request) -> Response:
    return sse_response(request.app.state.dashboard.events())


def install_dashboard(app: FastAPI, engine: AsyncLLM) -> tuple[str, ...]:
    """Serve the dashboard from `app`; returns the paths that need no API key (the page)."""
    app.state.dashboard = DashboardHub(engine)
    app.include_router(router)
    return PAGE_PATHS
