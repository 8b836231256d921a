"""MultiprocExecutor: one worker process per rank, driven over pipes.

    engine core (driver)                       worker process, rank r
    --------------------                       ----------------------
    _call("execute", so) --pickle--> pipe --> getattr(worker, "execute")(so)
    rank 0's reply      <--pickle-- pipe <--  ("ok", result) or ("error", exception)

Every call goes to every rank (the tensor-parallel ranks run each step together: their
collectives meet in torch.distributed, at the rendezvous address the driver hands them), and
the driver waits for all replies, returning the one of the rank that samples (rank 0 under
tensor parallelism alone). While it waits it checks that every process is still alive, so a
worker that is killed or crashes makes the call raise WorkerDiedError within a fraction of a
second instead of hanging; the ranks blocked in a collective with it are then stopped by
shutdown(). Worker processes are daemons started with "spawn" (a fresh interpreter: no
inherited OpenMP or CUDA state), so they end with the engine.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import socket
import time
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
    def __init__(self, args: EngineArgs) -> None:
        context = multiprocessing.get_context("spawn")
        init_method = rendezvous(args) if args.world_size > 1 else None
        self.output_rank = args.output_rank
        self.workers: list[WorkerProcess] = []
        self._closed = False
        for rank in range(args.world_size):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=run_worker,
                                      args=(args, rank, child_end, init_method),
                                      name=f"pagedllm-worker-{rank}", daemon=True)
            process.start()
            child_end.close()  # so the driver sees EOF when the worker dies
            self.workers.append(WorkerProcess(rank, process, parent_end))
        try:  # each worker answers once it has loaded the model
            self.model_config = self._receive_all()[0]
        except BaseException:
            self.shutdown()  # ranks still waiting for a peer that failed: stop them now
            raise

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self.workers]

    def determine_num_blocks(self) -> KVCachePlan:
        plans = self._call_all("determine_num_blocks")
        return min(plans, key=lambda plan: plan.num_blocks)  # every rank must hold them

    def initialize_cache(self, plan: KVCachePlan) -> None:
        self._call_all("initialize_cache", plan)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self._call_all("execute", scheduler_output)[self.output_rank]

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return self._call_all(method, *args)

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
        return self._receive_all()

    def _receive_all(self) -> list[Any]:
        """Every rank's reply, in rank order. A dead rank raises WorkerDiedError for it, even
        when another rank's reply is an error (a collective that lost its peer) and came
        first: the death is the cause."""
        replies: dict[int, tuple[str, Any]] = {}
        by_conn = {worker.conn: worker for worker in self.workers}
        while len(replies) < len(self.workers):
            waiting = [w.conn for w in self.workers if w.rank not in replies]
            for conn in multiprocessing.connection.wait(waiting, timeout=POLL_S):
                worker = by_conn[conn]
                try:
                    replies[worker.rank] = conn.recv()
                except (EOFError, OSError) as exc:
                    raise self._died(worker) from exc
            self._raise_if_any_died()
            errors = [value for status, value in replies.values() if status == "error"]
            if errors:
                self._raise_if_any_died(grace_s=POLL_S * 5)
                raise errors[0]
        return [replies[worker.rank][1] for worker in self.workers]

    def _raise_if_any_died(self, grace_s: float = 0.0) -> None:
        """WorkerDiedError for the first dead rank, if any, after giving a rank that is
        going down `grace_s` to finish dying."""
        if grace_s:
            time.sleep(grace_s)
        for worker in self.workers:
            if not worker.process.is_alive():
                raise self._died(worker)

    def _died(self, worker: WorkerProcess) -> WorkerDiedError:
        worker.process.join(POLL_S)
        self._closed = True
        return WorkerDiedError(f"worker process {worker.process.pid} (rank {worker.rank}) died "
                               f"(exit code {worker.process.exitcode}); the engine cannot go on")


def rendezvous(args: EngineArgs) -> str:
    """The tcp:// address the ranks meet at: the configured port, or a free one."""
    port = args.distributed_master_port
    if port == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((args.distributed_master_addr, 0))
            port = probe.getsockname()[1]
    return f"tcp://{args.distributed_master_addr}:{port}"


def run_worker(args: EngineArgs, rank: int, conn: multiprocessing.connection.Connection,
               init_method: str | None = None) -> None:
    """A worker process's main loop: answer calls until told to stop or the driver goes away."""
    from pagedllm.worker.worker import Worker

    try:
        worker = Worker(args, rank, init_method)
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
