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
def running_server(log_dir: Path, *args: str, api_key: str | None = None
                   ) -> Iterator[ServerProcess]:
    """A healthy `pagedllm serve` for the block (a module fixture's body), stopped after it."""
    server = launch_server(log_dir, *args, api_key=api_key)
    try:
        server.wait_until_healthy()
        yield server
    finally:
        server.stop()
