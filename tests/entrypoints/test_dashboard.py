"""The live dashboard (entrypoints/openai/dashboard.py and static/): its encoding without a
browser, then one real `pagedllm serve` under load from the test, opened by a headless Chromium
(Debian's chromium + chromium-driver, installed here if missing) driven by Selenium."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedllm.core.snapshot import (
    CACHED,
    FREE,
    HASH_PREFIX_BYTES,
    HIT,
    SHARED,
    STATE_NAMES,
    USED,
    EngineSnapshot,
    RequestView,
)
from pagedllm.core.stats import KVCacheStats
from pagedllm.engine.errors import EngineDeadError
from pagedllm.engine.request_tracking import RequestStats
from pagedllm.entrypoints.openai.dashboard import (
    CLIENT_BACKLOG,
    DashboardHub,
    LatencyWindow,
    block_runs,
    expand_runs,
    sample,
    update_message,
)

from .server_utils import ServerProcess, engine_state, running_server, sse_events_iter

API_KEY = "sk-dashboard"
# where the screenshot under load goes (docs/dashboard.png was made with this); else tmp_path
SCREENSHOT = os.environ.get("PAGEDLLM_DASHBOARD_SCREENSHOT")
UPDATE_WAIT_S = 30
MAX_TOKENS = 300  # each stream of the load: it outlasts the checks, and the test ends it


# ---- the encoding, no browser ---------------------------------------------------------------------
def kv_stats(num_blocks: int, num_free: int, queries: int = 0, hits: int = 0) -> KVCacheStats:
    return KVCacheStats(num_blocks, num_free, 16, (num_blocks - num_free) * 16, 3, queries, hits,
                        0, 0, 0, 0, 0, 0, 0)


def snapshot_of(states: list[int], requests: list[RequestView], taken_at: float = 10.0,
                prompt: int = 0, output: int = 0, queries: int = 0,
                hits: int = 0) -> EngineSnapshot:
    hashes = b"".join(bytes([b % 256, 1, 2, 3]) if s in (CACHED, HIT) else bytes(4)
                      for b, s in enumerate(states))
    free = sum(s in (FREE, CACHED) for s in states)
    return EngineSnapshot(taken_at, 7, bytes(states), hashes, requests, 1, 0,
                          kv_stats(len(states), free, queries, hits), prompt, output)


@pytest.mark.parametrize("ids", [[], [5], [3, 4, 5, 9, 10, 2], list(range(1000)), [7, 6, 5]])
def test_block_tables_travel_as_runs(ids):
    runs = block_runs(ids)
    assert expand_runs(runs) == ids
    assert len(runs) == 2 * sum(1 for i, b in enumerate(ids) if i == 0 or ids[i - 1] + 1 != b)


def test_an_update_carries_states_hashes_and_owners_compactly():
    states = [USED, USED, HIT, SHARED, SHARED, CACHED, FREE, FREE] * 500  # 4000 blocks
    owner = RequestView("cmpl-a-0", "running", 40, 40, 3, 32, 1.25, [0, 1, 2, 3, 4])
    other = RequestView("cmpl-b-0", "running", 40, 40, 1, 32, 0.5, [3, 4, 8, 9])
    waiting = RequestView("cmpl-c-0", "waiting", 12, 0, 0, 0, 0.1, [])
    message = update_message(snapshot_of(states, [owner, other, waiting]), {"t": 1.0})
    decoded = json.loads(json.dumps(message))  # what the page parses
    assert decoded["states"] == list(STATE_NAMES)
    assert list(base64.b64decode(decoded["blocks"])) == states
    hashes = base64.b64decode(decoded["hashes"])
    assert len(hashes) == HASH_PREFIX_BYTES * len(states)
    assert hashes[2 * 4:3 * 4] == bytes([2, 1, 2, 3]) and hashes[0:4] == bytes(4)
    assert [r["blocks"] for r in decoded["requests"]] == [[0, 5], [3, 2, 8, 2], []]
    assert decoded["requests"][0] == {"id": "cmpl-a-0", "state": "running", "prompt": 40,
                                      "computed": 40, "output": 3, "cached": 32, "age": 1.25,
                                      "blocks": [0, 5]}
    assert decoded["num_blocks"] == 4000 and decoded["kv"]["num_free_blocks"] == 1500
    # bytes per block, not an object per block: base64 of 1 state byte and 4 hash bytes is
    # under 7 characters a block
    assert len(json.dumps(message)) < 4000 * 7


def test_the_request_list_is_capped_but_counted():
    views = [RequestView(f"r{i}", "waiting", 5, 0, 0, 0, 0.0, []) for i in range(10)]
    message = update_message(snapshot_of([FREE] * 4, views), {}, max_requests=3)
    assert [r["id"] for r in message["requests"]] == ["r0", "r1", "r2"]
    assert message["num_requests"] == 10


def test_a_sample_has_rates_since_the_previous_snapshot_and_latency_percentiles():
    latencies = LatencyWindow(window_s=60)
    for i in range(10):  # ttft 0.1 .. 1.0 s; 11 tokens over 1 s: 0.1 s between tokens
        latencies.observe(RequestStats(f"r{i}", "length", 8, 11, 100.0, 100.0,
                                       100.1 + 0.1 * i, 101.1 + 0.1 * i))
    latencies.observe(RequestStats("old", "length", 8, 11, 0.0, 0.0, 50.0, 51.0))  # too old
    before = snapshot_of([USED, FREE], [], taken_at=110.0, prompt=100, output=40, queries=64,
                         hits=16)
    after = snapshot_of([USED, FREE], [], taken_at=112.0, prompt=300, output=100, queries=96,
                        hits=40)
    first = sample(before, None, latencies)
    assert first["output_tps"] is None and first["hit_rate"] is None
    point = sample(after, before, latencies)
    assert point["output_tps"] == pytest.approx(30.0) and point["prompt_tps"] == 100.0
    assert point["hit_rate"] == pytest.approx(24 / 32)
    assert point["kv_usage"] == 0.5 and point["running"] == 1
    assert point["ttft_p50"] == pytest.approx(0.55) and point["ttft_p99"] < 1.0 + 1e-9
    assert point["itl_p50"] == pytest.approx(0.1)
    json.dumps(point, allow_nan=False)


class FakeEngine:
    """What the hub needs of AsyncLLM: snapshots (counted) and an observer hook."""

    def __init__(self, dead: bool = False) -> None:
        self.calls = 0
        self.dead = dead

    def add_observer(self, observer) -> None:
        pass

    async def snapshot(self) -> EngineSnapshot:
        self.calls += 1
        if self.dead:
            raise EngineDeadError("the engine has stopped")
        return snapshot_of([USED, FREE], [], taken_at=time.monotonic(), output=10 * self.calls)


def test_the_hub_samples_only_while_a_stream_is_open_and_drops_for_slow_clients():
    async def run() -> None:
        engine = FakeEngine()
        hub = DashboardHub(engine, interval_s=0.01)
        fast, slow = hub.events(), hub.events()
        assert (await anext(fast)).startswith("event: history\ndata: []")
        await anext(slow)
        updates = [await anext(fast) for _ in range(5)]
        assert all(u.startswith("event: update\ndata: ") for u in updates)
        assert all(q.qsize() <= CLIENT_BACKLOG for q in hub.listeners)  # slow never read more
        await fast.aclose()
        await slow.aclose()
        calls = engine.calls
        await asyncio.sleep(0.1)
        assert engine.calls == calls and not hub.listeners  # no page, no snapshot
        again = hub.events()
        history = json.loads((await anext(again)).split("data: ", 1)[1])
        assert len(history) >= 5 and history[-1]["output_tps"] is not None
        await again.aclose()

    asyncio.run(run())


def test_a_dead_engine_is_an_event_not_a_hang():
    async def run() -> str:
        events = DashboardHub(FakeEngine(dead=True), interval_s=0.01).events()
        await anext(events)
        try:
            return await anext(events)
        finally:
            await events.aclose()

    event = asyncio.run(run())
    assert event.startswith("event: engine_error\n")
    assert json.loads(event.split("data: ", 1)[1]) == {"message": "the engine has stopped"}


# ---- a real server and a real browser ------------------------------------------------------------
def ensure_chromium() -> tuple[str, str]:
    """Debian's chromium and its driver, installed with apt-get when missing (as root)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("chromium and chromium-driver are missing, and apt-get cannot install "
                        "them here (not root, or no apt-get)")
        apt = {"check": True, "capture_output": True, "timeout": 900,
               "env": {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}}
        install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
        try:
            try:
                subprocess.run(install, **apt)
            except subprocess.CalledProcessError:  # package lists missing or stale on a fresh box
                subprocess.run(["apt-get", "update", "-q"], **apt)
                subprocess.run(install, **apt)
        except (subprocess.SubprocessError, OSError) as exc:
            pytest.skip(f"could not install chromium and chromium-driver with apt-get: {exc}")
    return shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("dashboard"), "--kv-cache-memory", "192MiB",
                        "--max-model-len", "512", "--disable-access-log",
                        api_key=API_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = ensure_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


class Load:
    """Streaming completions on threads of their own, each ended (and so aborted on the
    server) when the test is done with it."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.ids: dict[int, str] = {}  # stream index -> the server's completion id
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, prompt: str, max_tokens: int) -> int:
        index = len(self.threads)
        thread = threading.Thread(target=self._stream, args=(index, prompt, max_tokens),
                                  daemon=True)
        self.threads.append(thread)
        thread.start()
        return index

    def _stream(self, index: int, prompt: str, max_tokens: int) -> None:
        body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                "temperature": 0}
        with contextlib.suppress(httpx.HTTPError), httpx.stream(
                "POST", self.server.url + "/v1/completions", json=body,
                headers=self.server.headers, timeout=120) as response:
            if response.status_code != 200:
                self.errors.append(f"{response.status_code}: {response.read()[:300]!r}")
                return
            for event in sse_events_iter(response):
                if event != "[DONE]":
                    self.ids.setdefault(index, json.loads(event)["id"])
                if self.stop.is_set():
                    return

    def engine_id(self, index: int) -> str:
        wait_until(lambda: index in self.ids or self.errors, "the stream's first chunk")
        assert not self.errors
        return self.ids[index] + "-0"  # the engine's id of its one prompt

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def wait_until(condition, what: str, timeout: float = UPDATE_WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def page(driver, expression: str):
    return driver.execute_script(f"return {expression};")


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers=server.headers, timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                return s.value
    raise AssertionError(f"{name} not in /metrics")


def severe_console_messages(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


SHARED_PROMPT = ("The paged KV cache keeps every sequence in fixed-size blocks, so that memory "
                 "is handed out one block at a time and a prefix computed once can be reused "
                 "by every request that starts with it. ") * 3
# A finished request over HEAD + TAIL leaves both cached; one running request on HEAD + another
# ending takes HEAD's blocks back alone (prefix hits), TAIL's stay cached.
HEAD = ("Blocks that no request holds any more keep their hash until the pool hands them out "
        "again, so the next request with the same beginning skips computing it. ") * 2
TAIL = "Then the story goes on about something else entirely, for a while longer. " * 3
OTHER_PROMPTS = ["Write a story about a lighthouse keeper", "List the planets of the solar system",
                 HEAD + "Now write a short poem about the sea."]
NUM_LOAD = 5  # streams of the load


def test_the_stream_needs_the_api_key_and_the_page_does_not(server):
    url = server.url
    page_response = httpx.get(url + "/dashboard", timeout=10)
    assert page_response.status_code == 200 and "dashboard.js" in page_response.text
    assert httpx.get(url + "/dashboard/dashboard.js", timeout=10).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(url + "/dashboard/stream", headers=headers, timeout=10)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_api_key"
    # the key travels in the Authorization header only, never in a URL (access logs keep URLs)
    assert httpx.get(url + "/dashboard/stream", params={"key": API_KEY},
                     timeout=10).status_code == 401
    with httpx.stream("GET", url + "/dashboard/stream", headers=server.headers,
                      timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events_iter(response)
        history = json.loads(next(events))
        update = json.loads(next(events))
    assert isinstance(history, list)
    assert len(base64.b64decode(update["blocks"])) == update["num_blocks"] > 0


def test_the_page_shows_the_engine_under_load(server, browser, tmp_path):
    http = httpx.Client(base_url=server.url, headers=server.headers, timeout=120)
    # A finished request leaves its full blocks cached: free, but holding a prefix hash.
    done = http.post("/v1/completions", json={"prompt": SHARED_PROMPT, "max_tokens": 1})
    assert done.status_code == 200, done.text
    assert http.post("/v1/completions", json={"prompt": HEAD + TAIL,
                                              "max_tokens": 1}).status_code == 200
    browser.get(server.url + f"/dashboard?key={API_KEY}")
    wait_until(lambda: page(browser, "window.pagedllmDashboard.updates") >= 2, "two updates")
    assert "key=" not in browser.current_url  # kept in sessionStorage, off the address bar
    num_prompt_tokens = done.json()["usage"]["prompt_tokens"]
    wait_until(lambda: page(browser, "window.pagedllmDashboard.counts.cached")
               >= num_prompt_tokens // 16, "the cached blocks of the finished request")

    load = Load(server)
    try:
        hits = [load.start(SHARED_PROMPT, MAX_TOKENS) for _ in range(2)]  # the cached prefix
        for prompt in OTHER_PROMPTS:
            load.start(prompt, MAX_TOKENS)
        wait_until(lambda: load.errors or page(browser, "window.pagedllmDashboard.running")
                   == NUM_LOAD, "the load's requests running on the page")
        assert not load.errors
        counts = page(browser, "window.pagedllmDashboard.counts")
        assert counts["hit"] >= 1 and counts["cached"] >= 1, counts  # HEAD's and TAIL's blocks
        # a hit leaves at least the last prompt token to compute
        check_prefix_hits(browser, [load.engine_id(i) for i in hits],
                          (num_prompt_tokens - 1) // 16)
        check_in_use_cells_match_the_engine(browser, server)
        check_running_matches_metrics(browser, server)
        check_a_click_names_the_owners_and_the_hash(browser, [load.engine_id(i) for i in hits])
        updates = page(browser, "window.pagedllmDashboard.updates")
        wait_until(lambda: page(browser, "window.pagedllmDashboard.updates") >= updates + 6,
                   "a few more updates for the charts")
        shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "dashboard.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        load.end()
        http.close()
    wait_until(lambda: page(browser, "window.pagedllmDashboard.running") == 0,
               "the page to see the load end")
    assert page(browser, "window.pagedllmDashboard.counts.in_use") == 0
    # the ended requests stay a moment, fading
    assert page(browser, "document.querySelectorAll('#requests tr.finished').length") >= 1
    assert severe_console_messages(browser) == []


def check_prefix_hits(browser, request_ids: list[str], num_prompt_blocks: int) -> None:
    """Both requests run on the cached prefix together: those blocks are shared by them."""
    def prefix_states():
        states = [page(browser, f"window.pagedllmDashboard.statesOf({json.dumps(r)})")
                  for r in request_ids]
        return states if all(states) else None

    states = wait_until(prefix_states, "the prefix-hit requests on the page")
    for request_states in states:
        assert request_states[:num_prompt_blocks] == ["shared"] * num_prompt_blocks, states
    assert page(browser, "window.pagedllmDashboard.counts.shared") >= num_prompt_blocks


def check_in_use_cells_match_the_engine(browser, server: ServerProcess) -> None:
    """The page's in-use cells equal the engine's own count after the step its update
    followed (the engine's step record of that step)."""
    http = httpx.Client(base_url=server.url, headers=server.headers, timeout=30)
    for _ in range(5):  # an update may follow a step that ran nothing (no record)
        step, in_use, counted = page(browser, "[window.pagedllmDashboard.step, Number("
                                     "document.getElementById('blockmap').dataset.inUse), "
                                     "window.pagedllmDashboard.counts.in_use]")
        assert in_use == counted
        records = [r for r in engine_state(http, since=step - 1)["steps"] if r["step"] == step]
        if records:
            kv = records[0]["kv_cache"]
            assert in_use == kv["num_blocks"] - kv["num_free_blocks"] > 0
            return
        time.sleep(0.4)
    pytest.fail("no step record for the steps the page showed")


def check_a_click_names_the_owners_and_the_hash(browser, request_ids: list[str]) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    block = page(browser, f"window.pagedllmDashboard.blocksOf({json.dumps(request_ids[0])})[0]")
    x, y = page(browser, f"window.pagedllmDashboard.cellCenter({block})")
    canvas = browser.find_element("id", "blockmap")
    # Selenium 4 offsets from the element's centre
    ActionChains(browser).move_to_element_with_offset(
        canvas, int(x - canvas.size["width"] / 2), int(y - canvas.size["height"] / 2)).click().perform()
    detail = browser.find_element("id", "block-detail").text
    assert f"block  {block}: shared by several requests" in detail, detail
    assert all(r in detail for r in request_ids), detail
    assert re.search(r"hash   [0-9a-f]{8}\n", detail), detail


def check_running_matches_metrics(browser, server: ServerProcess) -> None:
    shown = int(browser.find_element("id", "running").text)
    assert shown == metric(server, "pagedllm:num_requests_running") == NUM_LOAD
