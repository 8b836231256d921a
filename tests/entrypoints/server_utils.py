"""Start and stop a real `pagedllm serve` process for tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

STARTUP_TIMEOUT_S = 180  # model load is ~15 s alone; more when the machine is busy
DEAD_ENGINE_EXIT_S = 10  # the watchdog polls every 0.5 s, then gives responses 1 s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_until_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.proc.kill()
        pytest.fail(f"server not healthy after {timeout} s:\n{self.log_tail()}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send the signal and return the exit status (killing the process if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"server did not exit within {timeout} s of {signum}:\n{self.log_tail()}")


def launch_server(log_dir: Path, *args: str, api_key: str | None = None) -> ServerProcess:
    """Start `python -m pagedllm.entrypoints.cli serve` on a free port; does not wait."""
    port = free_port()
    command = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--host", "127.0.0.1",
               "--port", str(port), *args]
    if api_key:
        command += ["--api-key", api_key]
    log_path = log_dir / f"server-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PAGEDLLM_API_KEY", None)
    # Output goes to a file: a pipe nobody reads would fill up and block the server.
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    return ServerProcess(proc, port, log_path, api_key)


@contextlib.contextmanager
def killed_at_exit(server: ServerProcess) -> Iterator[ServerProcess]:
    """The block's server, killed at the end if the block left it running (a test that stops
    it itself checks how it exits; this only makes sure none is left behind)."""
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


@contextlib.contextmanager
def running_server(log_dir: Path, *args: str, api_key: str | None = None
                   ) -> Iterator[ServerProcess]:
    """A healthy `pagedllm serve` for the block (a module fixture's body), stopped after it."""
    server = launch_server(log_dir, *args, api_key=api_key)
    try:
        server.wait_until_healthy()
        yield server
    finally:
        server.stop()


# ---- talking to a running server -------------------------------------------------------------
def sse_events_iter(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: "):]


def engine_state(http: httpx.Client, since: int = 0) -> dict:
    response = http.get("/debug/step_stats", params={"since": since})
    assert response.status_code == 200, response.text
    return response.json()


def stream_until_killed(server: ServerProcess, pid: int) -> list[str]:
    """A long stream during which process `pid` (the engine core, or a worker) is killed
    after its second event."""
    body = {"prompt": "Once upon a time", "max_tokens": 400,  # no model: the one served
            "ignore_eos": True, "stream": True}
    events = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        for event in sse_events_iter(response):
            events.append(event)
            if len(events) == 2:
                os.kill(pid, signal.SIGKILL)
    return events


def health_after_death(server: ServerProcess) -> int | None:
    """/health's status once the engine is gone; None if the server stopped listening."""
    try:
        return httpx.get(server.url + "/health", timeout=5).status_code
    except httpx.TransportError:
        return None
