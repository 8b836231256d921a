"""Shared fixtures for the entrypoint tests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest


class OfflineLLM:
    """The offline `LLM`, loaded once, every call run on one worker thread of its own.

    Why a thread: once torch has computed on another thread (an AsyncLLM's engine thread),
    torch work on the *main* thread runs ~20x slower with GNU OpenMP's default active wait
    policy. Keeping all of this process's torch work off the main thread avoids that.
    """

    def __init__(self, **engine_args) -> None:
        from pagedllm import LLM

        self._thread = ThreadPoolExecutor(1, thread_name_prefix="offline-llm")
        self.llm = self._thread.submit(LLM, **engine_args).result()
        self.llm_engine = self.llm.llm_engine

    def generate(self, *args, **kwargs):
        return self._thread.submit(self.llm.generate, *args, **kwargs).result()

    def chat(self, *args, **kwargs):
        return self._thread.submit(self.llm.chat, *args, **kwargs).result()

    def beam_search(self, *args, **kwargs):
        return self._thread.submit(self.llm.beam_search, *args, **kwargs).result()

    def close(self) -> None:
        self._thread.shutdown()


@pytest.fixture(scope="session")
def offline_llm():
    """The reference the server and AsyncLLM must match."""
    llm = OfflineLLM(kv_cache_memory_bytes=128 << 20)
    yield llm
    llm.close()


# A module that starts a `server` fixture (server_utils.running_server) gets these for it.
@pytest.fixture(scope="module")
def client(server):
    """The official openai client of the module's server."""
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=120) as session:
        yield session
