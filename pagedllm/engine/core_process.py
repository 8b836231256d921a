"""The engine core in a process of its own, and the client the front-end talks to it through.

    front-end process                                      core process (run_engine_core)
    -----------------                                      ------------------------------
    CoreProcessClient.add_request(r) --("add", r)------->  core.add_request(r)
                     .abort_requests --("abort", ids)--->  core.abort_requests(ids)
                     .finish_requests ("finish", ids)--->  core.finish_requests(ids)  (stop strings)
                     .request_snapshot ("snapshot")----->  core.snapshot()  (the dashboard)
                                                           while it has work: core.step()
    reader thread: queue <---------------("outputs", EngineCoreOutputs)
                           <-------------("step_failed", message)   in-flight requests aborted
                           <-------------("dead", message)          a worker died: exit(1)
    reader thread: future  <-------------("snapshot", EngineSnapshot)  answered between steps

Two one-way pipes, pickled messages. The core process steps as fast as it can and never waits
for the front-end; it drains its inbox between steps (blocking on it only while idle). So HTTP
handling, detokenizing and the step loop share neither a GIL nor an OpenMP team.

Requests are validated in the front-end (input_processor.py) before they are sent, so an add
that the core still rejects is answered with an 'abort' output rather than an error reply.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import contextlib
import multiprocessing
import multiprocessing.connection
import sys
import threading
from collections.abc import Callable
from typing import Any

from pagedllm.config import EngineArgs
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.snapshot import EngineSnapshot
from pagedllm.core.stats import KVCacheStats
from pagedllm.core.step_io import EngineCoreOutput
from pagedllm.engine.beam_ranking import BeamSearchParams
from pagedllm.engine.core import CoreStats, EngineCore, EngineCoreOutputs
from pagedllm.engine.errors import EngineDeadError, EngineStepError
from pagedllm.executor import WorkerDiedError
from pagedllm.logger import init_logger
from pagedllm.outputs import RequestOutput
from pagedllm.tokenizer import load_engine_tokenizer

logger = init_logger(__name__)

POLL_S = 0.1  # how often a waiting client checks that the core process is alive
SHUTDOWN_WAIT_S = 10.0


class CoreProcessClient:
    """EngineCore's calls, answered by a core process. `step()` hands out the outputs of the
    next step the process has finished; `ready_to_step()` says whether one is waiting."""

    def __init__(self, args: EngineArgs) -> None:
        context = multiprocessing.get_context("spawn")
        core_reads, self._to_core = context.Pipe(duplex=False)
        self._from_core, core_writes = context.Pipe(duplex=False)
        # Not a daemon: it may start worker processes of its own (executor "mp"). It still ends
        # with us: it exits when its inbox reaches EOF, and shutdown() runs at exit (atexit
        # runs it before multiprocessing's own handler, which would wait for the process).
        self.process = context.Process(target=run_engine_core,
                                       args=(args, core_reads, core_writes),
                                       name="pagedllm-engine-core")
        self.process.start()
        atexit.register(self.shutdown)
        core_reads.close()  # our copies: closing them lets each side see EOF when the other dies
        core_writes.close()
        self.model_config, self.cache_config, self._stats, self.worker_pids = (
            self._wait_until_ready())
        self.tokenizer = load_engine_tokenizer(args, self.model_config.source)
        self.wakeup: Callable[[], None] = lambda: None  # called when a message arrives
        self._received: collections.deque[tuple[str, Any]] = collections.deque()
        self._arrived = threading.Condition()
        self._dead: str | None = None
        # snapshot requests in the order sent; the core answers them in that order
        self._snapshots: collections.deque[concurrent.futures.Future] = collections.deque()
        self._reader = threading.Thread(target=self._read, name="pagedllm-core-reader",
                                        daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_until_ready(self) -> tuple[Any, Any, CoreStats, tuple[int, ...]]:
        """Block while the process loads the model; its start-up error is raised here."""
        while not self._from_core.poll(POLL_S):
            if not self.process.is_alive():
                raise EngineDeadError(f"the engine core process exited during start-up (exit "
                                      f"code {self.process.exitcode})")
        kind, payload = self._from_core.recv()
        if kind == "error":
            raise payload
        return payload

    # ---- requests (sent; the core answers through its outputs) ------------------------------------
    def add_request(self, request: Request) -> None:
        self._send("add", request)

    def add_beam_search(self, request_id: str, prompt: str | None, first: Request,
                        params: BeamSearchParams) -> None:
        self._send("add_beam_search", (request_id, prompt, first, params))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self._send("abort", request_ids)

    def finish_requests(self, request_ids: list[str],
                        status: RequestStatus = RequestStatus.FINISHED_STOPPED) -> None:
        if request_ids:
            self._send("finish", (request_ids, status))

    def request_snapshot(self) -> concurrent.futures.Future[EngineSnapshot]:
        """Ask for the core's snapshot (core/snapshot.py); the future has it once the core has
        finished its current step. The caller never blocks the step loop or this client."""
        future: concurrent.futures.Future[EngineSnapshot] = concurrent.futures.Future()
        with self._arrived:  # the reader fails what is queued if the core dies meanwhile
            self._snapshots.append(future)
        try:
            self._send("snapshot", None)
        except EngineDeadError as exc:
            future.set_exception(exc)
        return future

    def _send(self, kind: str, payload: Any) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        try:
            self._to_core.send((kind, payload))
        except (BrokenPipeError, OSError) as exc:
            raise EngineDeadError("the engine core process has exited") from exc

    # ---- outputs ------------------------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                message = self._from_core.recv()
            except (EOFError, OSError):
                self.process.join(POLL_S)
                message = ("dead", f"the engine core process exited (exit code "
                                   f"{self.process.exitcode})")
            if message[0] == "snapshot" or message[0] == "dead":
                self._answer_snapshots(message)
                if message[0] == "snapshot":
                    continue
            with self._arrived:
                self._received.append(message)
                self._arrived.notify()
            self.wakeup()
            if message[0] == "dead":
                return

    def _answer_snapshots(self, message: tuple[str, Any]) -> None:
        """A snapshot answers the oldest request; a dead core fails them all."""
        with self._arrived:
            pending = ([self._snapshots.popleft()] if message[0] == "snapshot" and self._snapshots
                       else [])
            if message[0] == "dead":
                pending, self._snapshots = list(self._snapshots), collections.deque()
        for future in pending:
            if future.done():
                continue  # a caller that gave up on it cancelled it
            if message[0] == "snapshot":
                future.set_result(message[1])
            else:
                future.set_exception(EngineDeadError(message[1]))

    def ready_to_step(self) -> bool:
        return bool(self._received)

    def step(self) -> EngineCoreOutputs:
        """The next step's outputs, waiting for them if none has arrived (the offline loop);
        raises EngineStepError if the step failed (its requests were aborted in the core),
        EngineDeadError if the core is gone."""
        with self._arrived:
            self._arrived.wait_for(lambda: self._received)
            kind, payload = self._received.popleft()
        if kind == "outputs":
            self._stats = payload.stats
            return payload
        if kind == "step_failed":
            raise EngineStepError(payload)
        self._dead = payload
        self._received.appendleft((kind, payload))  # every later call sees it too
        raise EngineDeadError(payload)

    def stats(self) -> CoreStats:
        return self._stats

    def get_num_unfinished_requests(self) -> int:
        return self._stats.num_running + self._stats.num_waiting

    def kv_cache_stats(self) -> KVCacheStats:
        return self._stats.kv_cache

    def shutdown(self) -> None:
        atexit.unregister(self.shutdown)
        if self.process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self._to_core.send(("shutdown", None))
            self.process.join(SHUTDOWN_WAIT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(SHUTDOWN_WAIT_S)


# ---- the core process -------------------------------------------------------------------------------
def run_engine_core(args: EngineArgs, inbox: multiprocessing.connection.Connection,
                    outbox: multiprocessing.connection.Connection) -> None:
    try:
        core = EngineCore(args)
    except BaseException as exc:
        outbox.send(("error", exc if _picklable(exc) else RuntimeError(repr(exc))))
        return
    outbox.send(("ready", (core.model_config, core.cache_config, core.stats(),
                           core.worker_pids)))
    try:
        CoreLoop(core, inbox, outbox).run()
    except WorkerDiedError as exc:
        logger.error("%s", exc)
        _send_quietly(outbox, ("dead", str(exc)))
        sys.exit(1)
    finally:
        core.shutdown()


class CoreLoop:
    """Drain the inbox, step while there is work, send each step's outputs; block only when
    idle."""

    def __init__(self, core: EngineCore, inbox: multiprocessing.connection.Connection,
                 outbox: multiprocessing.connection.Connection) -> None:
        self.core = core
        self.inbox = inbox
        self.outbox = outbox
        self.rejected: list[EngineCoreOutput] = []  # adds the core refused, answered as aborts
        self.rejected_searches: list[RequestOutput] = []

    def run(self) -> None:
        while True:
            changed = False
            while self.inbox.poll(0 if changed or self.core.has_unfinished_requests() else None):
                try:
                    kind, payload = self.inbox.recv()
                except (EOFError, OSError):
                    return  # the front-end is gone
                if kind == "shutdown":
                    return
                self._handle(kind, payload)
                changed = True
            if self.core.has_unfinished_requests():
                self._step()
            elif changed:  # no step: still tell the front-end what its commands changed
                self._send(EngineCoreOutputs([], self.core.stats()))

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "add":
            try:
                self.core.add_request(payload)
            except ValueError as exc:
                logger.error("request %s rejected by the engine core: %s", payload.request_id,
                             exc)
                ids = [payload.request_id, *payload.pending_fork_ids]
                self.rejected += [EngineCoreOutput(i, [], [], finish_reason="abort") for i in ids]
        elif kind == "add_beam_search":
            request_id, prompt, first, params = payload
            try:
                self.core.add_beam_search(request_id, prompt, first, params)
            except ValueError as exc:
                logger.error("beam search %s rejected by the engine core: %s", request_id, exc)
                self.rejected_searches.append(RequestOutput(
                    request_id, prompt, first.prompt_token_ids, [], finished=True))
        elif kind == "abort":
            self.core.abort_requests(payload)
        elif kind == "finish":
            self.core.finish_requests(*payload)
        elif kind == "snapshot":
            self.outbox.send(("snapshot", self.core.snapshot()))
        else:
            raise ValueError(f"unknown engine core message {kind!r}")

    def _step(self) -> None:
        try:
            outputs = self.core.step()
        except WorkerDiedError:
            raise
        except Exception as exc:
            logger.exception("engine step failed; aborting the requests in flight")
            self.core.abort_all()
            _send_quietly(self.outbox, ("step_failed", f"the engine failed while running this "
                                                       f"request: {type(exc).__name__}: {exc}"))
            return
        self._send(outputs)

    def _send(self, outputs: EngineCoreOutputs) -> None:
        if self.rejected or self.rejected_searches:
            outputs.outputs = self.rejected + outputs.outputs
            outputs.finished_searches = self.rejected_searches + outputs.finished_searches
            self.rejected, self.rejected_searches = [], []
        self.outbox.send(("outputs", outputs))


def _picklable(exc: BaseException) -> bool:
    import pickle

    try:
        pickle.dumps(exc)
    except Exception:
        return False
    return True


def _send_quietly(outbox: multiprocessing.connection.Connection, message: tuple) -> None:
    with contextlib.suppress(BrokenPipeError, OSError):
        outbox.send(message)
