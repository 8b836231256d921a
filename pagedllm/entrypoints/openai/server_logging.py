"""What the server writes to its log besides uvicorn's access lines: each request, when asked
(--enable-log-requests), and a periodic engine stats line while there is work (as vLLM prints;
--disable-log-stats turns it off)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from pagedllm.engine.async_llm import AsyncLLM, RequestStats
from pagedllm.logger import init_logger

logger = init_logger("pagedllm.server")


def clip(text: str, max_len: int | None) -> str:
    """`text`, cut to --max-log-len characters (with how much was left out)."""
    if max_len is None or len(text) <= max_len:
        return repr(text)
    return f"{text[:max_len]!r}... ({len(text) - max_len} more characters)"


@dataclass(slots=True)
class RequestLogger:
    """--enable-log-requests: a line as a request is accepted and one as it ends."""

    max_log_len: int | None = None

    def received(self, request_id: str, prompt: str | None, token_ids: list[int],
                 params: object) -> None:
        ids = token_ids if self.max_log_len is None else token_ids[:self.max_log_len]
        logger.info("received request %s: prompt %s, %d prompt tokens %s, params %s",
                    request_id, clip(prompt or "", self.max_log_len), len(token_ids), ids,
                    params)

    def finished(self, stats: RequestStats) -> None:
        """Runs on the engine thread as a request ends."""
        ttft = (f"{stats.first_token_time - stats.arrival_time:.3f} s"
                if stats.first_token_time is not None else "none")
        logger.info("finished request %s (%s): %d prompt tokens, %d generated, first token "
                    "after %s, %.3f s in all", stats.request_id, stats.finish_reason,
                    stats.num_prompt_tokens, stats.num_generation_tokens, ttft,
                    stats.finished_time - stats.arrival_time)


class StatsLogger:
    """Every `interval` seconds while requests run, wait or have just finished: prompt and
    generation tokens/s (of the requests that finished in the interval), running, waiting and
    swapped requests, KV-cache usage and prefix-cache hit rate."""

    def __init__(self, engine: AsyncLLM, interval: float) -> None:
        self.engine = engine
        self.interval = interval
        self._lock = threading.Lock()
        self._prompt_tokens = self._generation_tokens = 0
        engine.add_observer(self.observe)

    def observe(self, stats: RequestStats) -> None:
        with self._lock:
            self._prompt_tokens += stats.num_prompt_tokens
            self._generation_tokens += stats.num_generation_tokens

    def take_tokens(self) -> tuple[int, int]:
        with self._lock:
            counts = self._prompt_tokens, self._generation_tokens
            self._prompt_tokens = self._generation_tokens = 0
        return counts

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.log_once()

    def log_once(self) -> bool:
        """Logs a line if there was work in the interval; says whether it did."""
        stats = self.engine.stats
        prompt, generation = self.take_tokens()
        if not (stats.num_running or stats.num_waiting or prompt or generation):
            return False
        kv = stats.kv_cache
        logger.info("engine: prompt %.1f tokens/s, generation %.1f tokens/s, running %d, "
                    "waiting %d, swapped %d requests; KV cache %.1f%% used, prefix cache "
                    "hit rate %.1f%%", prompt / self.interval, generation / self.interval,
                    stats.num_running, stats.num_waiting,
                    kv.num_swapped_requests if kv else 0, 100 * stats.kv_cache_usage,
                    100 * kv.prefix_cache_hit_rate if kv else 0.0)
        return True
