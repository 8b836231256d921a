"""MultiprocExecutor: one worker process per rank, driven over pipes.

    engine core (driver)                       worker process, rank r
    --------------------                       ----------------------
    _call("execute", so) --pickle--> pipe --> getattr(worker, "execute")(so)
    rank 0's reply      <--pickle-- pipe <--  ("ok", result) or ("error", exception)

Every call goes to every rank (one rank today; the tensor-parallel ranks later), and the driver
waits for all replies, returning rank 0's. While it waits it checks that each process is still
alive, so a worker that is killed or crashes makes the call raise WorkerDiedError within a
fraction of a second instead of hanging. Worker processes are daemons started with "spawn" (a
fresh interpreter: no inherited OpenMP or CUDA state), so they end with the engine.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import traceback
from dataclasses import dataclass
from typing import Any

from pagedllm.config import EngineArgs
from pagedllm.core.step_io import ModelRunnerOutput, SchedulerOutput
from pagedllm.executor.base import Executor, WorkerDiedError
from pagedllm.logger import init_logger
from pagedllm.worker.worker import KVCachePlan

logger = init_logger(__name__)

POLL_S = 0.1  # how often a waiting driver checks that its workers are alive
SHUTDOWN_WAIT_S = 5.0


@dataclass(slots=True)
class WorkerProcess:
    rank: int
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection


class MultiprocExecutor(Executor):
    def __init__(self, args: EngineArgs, num_workers: int = 1) -> None:
        context = multiprocessing.get_context("spawn")
        self.workers: list[WorkerProcess] = []
        for rank in range(num_workers):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=run_worker, args=(args, rank, child_end),
                                      name=f"pagedllm-worker-{rank}", daemon=True)
            process.start()
            child_end.close()  # so the driver sees EOF when the worker dies
            self.workers.append(WorkerProcess(rank, process, parent_end))
        self._closed = False
        self.model_config = self._collect()  # each worker answers once it has loaded the model

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self.workers]

    def determine_num_blocks(self) -> KVCachePlan:
        plans = self._call_all("determine_num_blocks")
        return min(plans, key=lambda plan: plan.num_blocks)  # every rank must hold them

    def initialize_cache(self, plan: KVCachePlan) -> None:
        self._call_all("initialize_cache", plan)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self._call_all("execute", scheduler_output)[0]

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for worker in self.workers:
            with contextlib.suppress(BrokenPipeError, OSError):
                worker.conn.send(("shutdown", ()))
        for worker in self.workers:
            worker.process.join(SHUTDOWN_WAIT_S)
            if worker.process.is_alive():
                worker.process.kill()
            worker.conn.close()

    # ---- the driver's side of the pipes -----------------------------------------------------------
    def _call_all(self, method: str, *args: Any) -> list[Any]:
        if self._closed:
            raise WorkerDiedError("the executor has shut down")
        for worker in self.workers:
            try:
                worker.conn.send((method, args))
            except (BrokenPipeError, OSError) as exc:
                raise self._died(worker) from exc
        return [self._receive(worker) for worker in self.workers]

    def _collect(self) -> Any:
        return [self._receive(worker) for worker in self.workers][0]

    def _receive(self, worker: WorkerProcess) -> Any:
        while not worker.conn.poll(POLL_S):
            if not worker.process.is_alive():
                raise self._died(worker)
        try:
            status, value = worker.conn.recv()
        except (EOFError, OSError) as exc:
            raise self._died(worker) from exc
        if status == "error":
            raise value
        return value

    def _died(self, worker: WorkerProcess) -> WorkerDiedError:
        worker.process.join(POLL_S)
        self._closed = True
        return WorkerDiedError(f"worker process {worker.process.pid} (rank {worker.rank}) died "
                               f"(exit code {worker.process.exitcode}); the engine cannot go on")


def run_worker(args: EngineArgs, rank: int, conn: multiprocessing.connection.Connection) -> None:
    """A worker process's main loop: answer calls until told to stop or the driver goes away."""
    from pagedllm.worker.worker import Worker

    try:
        worker = Worker(args, rank)
    except BaseException as exc:
        _reply_error(conn, exc)
        return
    conn.send(("ok", worker.model_config))
    while True:
        try:
            method, call_args = conn.recv()
        except (EOFError, OSError):
            return  # the driver is gone
        if method == "shutdown":
            return
        try:
            result = getattr(worker, method)(*call_args)
        except BaseException as exc:
            _reply_error(conn, exc)
            continue
        conn.send(("ok", result))


def _reply_error(conn: multiprocessing.connection.Connection, exc: BaseException) -> None:
    """Send the exception itself where it pickles (a ValueError stays a ValueError for the
    user), else a RuntimeError carrying its traceback."""
    try:
        conn.send(("error", exc))
    except Exception:
        text = "".join(traceback.format_exception(exc))
        conn.send(("error", RuntimeError(f"worker error:\n{text}")))
