"""AsyncLLM: the engine for asyncio servers.

The front-end (LLMEngine: input and output processing) is not thread-safe, so it lives on one
background thread that owns it outright. The event loop never touches it; it talks to that
thread through a command list guarded by a condition variable:

    event loop                              engine thread
    ----------                              -------------
    add_requests() --command--> [commands] --> engine.add_request()   (reply: ok or ValueError)
    abort()        --command--> [commands] --> engine.abort_request()
                                               engine.step() ... outputs
    OutputStream  <--call_soon_threadsafe--    one batch of outputs per loop and step

The engine core sits behind the front-end either in this process (the thread steps it) or, with
engine_core_process, in its own process (engine/core_process.py): the thread then only turns
the steps that process sends into outputs, and HTTP handling no longer shares the step loop's
GIL. Commands run between steps, so a step never sees a half-added request. With no command and
no step to take, the thread sleeps on the condition instead of spinning.

Work whose cost grows with what a client sends (tokenizing a prompt, bad words, a chat template)
never runs on the engine thread or the event loop: `add_requests` turns prompts into engine
requests on a one-thread input pool first (`run_input_work`), so a huge prompt delays only the
inputs queued behind it, never the step loop or the other streams.

Health: `stalled_for()` says how long the engine has gone without finishing a turn while it had
work, so the server can answer 503 on /health while the loop is stuck. A step that fails aborts
its requests; MAX_STEP_FAILURES of them in a row mean the engine cannot run at all, and it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from pagedllm.config import EngineArgs
from pagedllm.core.snapshot import EngineSnapshot
from pagedllm.core.stats import KVCacheStats, SpecDecodingStats
from pagedllm.engine.beam_ranking import BeamSearchParams
from pagedllm.engine.core import EngineCore, StepRecord
from pagedllm.engine.errors import EngineDeadError, EngineOverloadedError, EngineStepError
from pagedllm.engine.llm_engine import LLMEngine, ProcessedInput
from pagedllm.engine.request_tracking import RequestStats, TrackedRequest, tracking_params
from pagedllm.executor import WorkerDiedError
from pagedllm.inputs import PromptType
from pagedllm.logger import init_logger
from pagedllm.lora.request import LoRARequest
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = init_logger(__name__)


__all__ = ["AsyncLLM", "EngineDeadError", "EngineOverloadedError", "EngineStepError",
           "NewRequest", "OutputStream", "RequestStats"]

MAX_STEP_FAILURES = 3  # failed steps in a row after which the engine stops for good


@dataclass(slots=True)
class NewRequest:
    request_id: str
    prompt: PromptType
    params: SamplingParams | BeamSearchParams
    priority: int = 0  # lower first, under scheduling_policy="priority"
    lora_request: LoRARequest | None = None  # the adapter it runs under (enable_lora)


@dataclass(slots=True, frozen=True)
class EngineStats:
    """Published by the engine thread after every change (a command, a step), before it replies
    or hands out outputs; an immutable snapshot, so any thread may read it."""

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0  # cached blocks that no request uses count as free
    num_blocks: int = 0
    num_steps: int = 0
    max_batch_size: int = 0  # most sequences scheduled together in one step so far
    num_loop_turns: int = 0  # times the thread woke up; stays put while idle
    kv_cache: KVCacheStats | None = None  # usage, prefix-cache hits, preemptions, swaps
    engine_core_pid: int | None = None  # the engine core's own process (None: in this one)
    worker_pids: tuple[int, ...] = ()  # the executor's worker processes ("mp", "ray"), wherever
    # LoRA (enable_lora; max_loras 0 when off): the adapters of running and waiting requests
    max_loras: int = 0
    running_loras: tuple[str, ...] = ()
    waiting_loras: tuple[str, ...] = ()
    spec_decoding: SpecDecodingStats | None = None  # drafts and acceptance (speculative_config)
    published_at: float = 0.0  # wall-clock time of this snapshot (time.time())

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_cache.usage if self.kv_cache is not None else 0.0


class OutputStream:
    """The outputs of one or more requests added together, in the order the engine made them.

    Iterate with `async for`; iteration ends when every request has finished. `abort()` ends
    whatever is still running (it is what a disconnected client's handler calls on its way out).
    """

    def __init__(self, engine: AsyncLLM, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self.loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.unfinished: set[str] = set()

    @property
    def finished(self) -> bool:
        return not self.unfinished

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.unfinished.clear()
            raise item
        if item.finished:
            self.unfinished.discard(item.request_id)
        return item

    def abort(self) -> None:
        if self.unfinished:
            self._engine.abort(list(self.unfinished))
            self.unfinished.clear()

    # Called on the event loop (scheduled there by the engine thread).
    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)


@dataclass(slots=True)
class _Command:
    run: Callable[[], Any]
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future | None = None

    def reply(self, result: Any = None, error: BaseException | None = None) -> None:
        if self.future is not None:
            _call_soon(self.loop, _resolve, self.future, result, error)


@dataclass(slots=True)
class _Inbox:
    commands: list[_Command] = field(default_factory=list)
    stopping: bool = False


class AsyncLLM:
    """`max_waiting_requests` bounds the requests accepted but not yet scheduled: beyond it
    `add_requests` raises EngineOverloadedError (a server's 503), so a flood cannot grow the
    queue, and the memory it holds, without limit. None: no bound (offline use)."""

    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None) -> None:
        if max_waiting_requests is not None and max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be at least 1, got "
                             f"{max_waiting_requests}")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.input_processor = engine.input_processor  # its checks are thread-safe
        self.max_waiting_requests = max_waiting_requests
        # max_tokens for a request that sets none (None: up to the context); a server sets it
        self.default_max_tokens: int | None = None
        self.stats = EngineStats()
        # Tokenizing and other input work: one thread, so the tokenizer is never used by two
        # threads at once (HF fast tokenizers are not safe for that) and inputs keep their order.
        self._input_pool = ThreadPoolExecutor(1, thread_name_prefix="pagedllm-input")
        self._unscheduled: set[str] = set()  # accepted, not yet scheduled (engine thread)
        self._consecutive_failures = 0  # failed steps in a row (engine thread)
        # When the engine last finished a turn, or had work again after idling (monotonic).
        self._progress_time = time.monotonic()
        self._inbox = _Inbox()
        self._wakeup = threading.Condition()
        self._tracked: dict[str, TrackedRequest] = {}  # owned by the engine thread
        self._observers: list[Callable[[RequestStats], None]] = []
        self._dead: BaseException | None = None
        self._max_batch_size = 0  # most requests scheduled together in one step
        self._turns = 0  # engine-thread loop turns: stays put while the thread sleeps
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
        if hasattr(engine.engine_core, "wakeup"):  # a core process: its outputs wake the thread
            engine.engine_core.wakeup = self._wake
        self._publish_stats()
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs,
                         max_waiting_requests: int | None = None) -> AsyncLLM:
        return cls(LLMEngine.from_engine_args(args), max_waiting_requests)

    def _wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    # ---- the event-loop side ------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    def stalled_for(self) -> float:
        """Seconds the engine has had work (requests in flight or commands queued) without
        finishing a turn of its loop; 0 while it makes progress or is idle."""
        if not (self._tracked or self._inbox.commands):
            return 0.0
        return max(0.0, time.monotonic() - self._progress_time)

    async def run_input_work(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn` (tokenizing, rendering a chat template, decoding) on the input thread:
        off the event loop and off the engine thread, one at a time."""
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._input_pool, lambda: fn(*args, **kwargs))
        except RuntimeError as exc:  # the pool refuses new work once shutdown() ran
            raise EngineDeadError("the engine is shutting down or has stopped") from exc
        return await future

    async def add_lora(self, lora_request: LoRARequest) -> None:
        """Check an adapter (reading its folder) and accept requests under it; ValueError
        naming the problem. On the input thread, where requests' adapters are checked too."""
        await self.run_input_work(self.engine.add_lora, lora_request)

    async def remove_lora(self, lora_int_id: int) -> bool:
        """Refuse new requests under the adapter (those in flight finish); False if unknown."""
        return await self.run_input_work(self.engine.remove_lora, lora_int_id)

    def add_observer(self, observer: Callable[[RequestStats], None]) -> None:
        """`observer(stats)` runs on the engine thread whenever a request ends."""
        self._observers.append(observer)

    async def add_requests(self, requests: list[NewRequest]) -> OutputStream:
        """Queue all requests or none; raises the engine's ValueError if one of them is bad."""
        loop = asyncio.get_running_loop()
        stream = OutputStream(self, loop)
        arrival = time.monotonic()
        inputs = await self.run_input_work(self._process_inputs, requests, arrival)
        stream.unfinished.update(r.request_id for r in requests)
        try:
            await self._ask(lambda: self._add(requests, inputs, stream, arrival))
        except asyncio.CancelledError:
            stream.abort()  # the requests may have been added meanwhile
            raise
        except BaseException:
            stream.unfinished.clear()
            raise
        return stream

    async def add_request(self, request_id: str, prompt: PromptType,
                          params: SamplingParams) -> OutputStream:
        return await self.add_requests([NewRequest(request_id, prompt, params)])

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Outputs of one request; closing the generator early aborts the request."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def abort(self, request_ids: Iterable[str]) -> None:
        """Thread-safe and non-blocking: the engine thread aborts them before its next step."""
        ids = list(request_ids)
        if ids:
            self._submit(_Command(lambda: self._abort(ids)))

    def abort_all(self) -> None:
        """End every request now; each stream gets a final output with finish_reason 'abort'."""
        self._submit(_Command(lambda: self._abort(list(self._tracked))))

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run `fn(engine)` on the engine thread between steps and return its result."""
        return await self._ask(lambda: fn(self.engine))

    async def step_records(self, since_step: int = 0,
                           limit: int = 2000) -> list[dict[str, Any]]:
        """The engine's step records after `since_step` (at most the newest `limit`), as plain
        dicts, oldest first; they name the requests each step ran."""
        def collect(engine: LLMEngine) -> list[dict[str, Any]]:
            newest = itertools.takewhile(lambda r: r.step > since_step, reversed(engine.step_records))
            return [asdict(r) for r in itertools.islice(newest, limit)][::-1]
        return await self.call(collect)

    async def snapshot(self) -> EngineSnapshot:
        """The engine core's blocks and requests between two steps (the dashboard's). A core
        in its own process answers through its pipe, and this thread never waits for it."""
        core = self.engine.engine_core
        if isinstance(core, EngineCore):
            return await self.call(lambda engine: core.snapshot())
        return await asyncio.wrap_future(core.request_snapshot())

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what is left, stop the thread and wait for it. Safe to call twice."""
        with self._wakeup:
            self._inbox.stopping = True
            self._wakeup.notify()
        self._input_pool.shutdown(wait=False, cancel_futures=True)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    async def _ask(self, run: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._submit(_Command(run, loop, future))
        return await future

    def _submit(self, command: _Command) -> None:
        with self._wakeup:
            if self._dead is not None or self._inbox.stopping:
                command.reply(error=EngineDeadError("the engine is shutting down or has stopped"))
                return
            if not (self._tracked or self._inbox.commands):  # work again after idling
                self._progress_time = time.monotonic()
            self._inbox.commands.append(command)
            self._wakeup.notify()

    # ---- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while (commands := self._next_commands()) is not None:
                self._turns += 1
                for command in commands:
                    self._execute(command)
                if self.engine.ready_to_step():
                    self._step()
                self._progress_time = time.monotonic()
        except BaseException as exc:  # a bug in the loop itself: stop taking requests
            logger.exception("the engine thread stopped")
            self._dead = exc
        finally:
            self._stop()

    def _next_commands(self) -> list[_Command] | None:
        """Wait until there is something to do; None means shut down."""
        with self._wakeup:
            while not (self._inbox.commands or self._inbox.stopping
                       or self.engine.ready_to_step()):
                self._wakeup.wait()
            if self._inbox.stopping:
                return None
            commands, self._inbox.commands = self._inbox.commands, []
            return commands

    def _execute(self, command: _Command) -> None:
        try:
            result = command.run()
        except Exception as exc:
            self._publish_stats()
            command.reply(error=exc)
            return
        self._publish_stats()  # before the reply, so the caller never sees an older snapshot
        command.reply(result)

    def _process_inputs(self, requests: list[NewRequest], arrival: float) -> list[ProcessedInput]:
        """On the input thread: tokenize and validate (a bad request raises its ValueError)."""
        return [self.engine.process_input(r.request_id, r.prompt, r.params, arrival, r.priority,
                                          self.default_max_tokens, r.lora_request)
                for r in requests]

    def _add(self, requests: list[NewRequest], inputs: list[ProcessedInput],
             stream: OutputStream, arrival: float) -> None:
        self._check_room(len(requests))
        added: list[str] = []
        try:
            for processed in inputs:
                self.engine.add_processed(processed)
                added.append(processed.request_id)
        except Exception:
            self.engine.abort_request(added)  # all or none, like LLM.generate
            raise
        for r in requests:
            self._tracked[r.request_id] = TrackedRequest(stream, tracking_params(r.params), arrival)
            self._unscheduled.add(r.request_id)

    def _check_room(self, num_new: int) -> None:
        limit = self.max_waiting_requests
        if limit is not None and len(self._unscheduled) + num_new > limit:
            raise EngineOverloadedError(
                f"the server is overloaded: {len(self._unscheduled)} requests are waiting to be "
                f"scheduled (at most {limit}); retry later")

    def _abort(self, request_ids: list[str]) -> None:
        finals = [self._aborted_output(r) for r in request_ids if r in self._tracked]
        self.engine.abort_request(request_ids)
        self._publish_stats()
        self._deliver(finals)  # ends the streams that still listen, and counts the aborts

    def _aborted_output(self, request_id: str) -> RequestOutput:
        tracked = self._tracked[request_id]
        if tracked.last is not None:
            prompt, prompt_ids = tracked.last.prompt, tracked.last.prompt_token_ids
        else:  # aborted before its first output: ask the engine what the prompt was
            state = self.engine.output_processor.states.get(request_id)
            prompt = getattr(state, "prompt", None)
            prompt_ids = list(getattr(state, "prompt_token_ids", []))
        return tracked.aborted(request_id, prompt, prompt_ids)

    def _step(self) -> None:
        steps_before = self.engine.num_steps
        try:
            outputs = self.engine.step()
        except (EngineDeadError, WorkerDiedError):
            raise  # the core or a worker is gone: nothing can be served any more
        except Exception as exc:
            self._consecutive_failures += 1
            logger.exception("engine step failed (%d in a row); aborting the %d requests in "
                             "flight", self._consecutive_failures, len(self._tracked))
            self._fail_all(EngineStepError(f"the engine failed while running this request: "
                                           f"{type(exc).__name__}: {exc}"))
            self._publish_stats()
            if self._consecutive_failures >= MAX_STEP_FAILURES:
                raise EngineDeadError(f"{MAX_STEP_FAILURES} engine steps failed in a row; the "
                                      f"engine cannot run (last: {exc})") from exc
            return
        self._consecutive_failures = 0
        if self.engine.num_steps > steps_before:
            self._note_scheduled(self.engine.step_records[-1])
        self._publish_stats()  # before the outputs: a client that got them sees this step
        self._deliver(outputs)

    def _note_scheduled(self, record: StepRecord) -> None:
        started = time.monotonic() - record.duration_s
        for engine_id in record.scheduled:
            # a forked sequence or a beam runs as "<request id>#<suffix>"
            request_id = engine_id if engine_id in self._tracked else engine_id.partition("#")[0]
            tracked = self._tracked.get(request_id)
            if tracked is not None and tracked.first_scheduled_time is None:
                tracked.first_scheduled_time = started
                self._unscheduled.discard(request_id)
        self._max_batch_size = max(self._max_batch_size, len(record.scheduled))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one thread-safe call per event loop."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[OutputStream, Any]]] = {}
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:
                continue
            tracked.observe(output)
            if output.finished:
                del self._tracked[output.request_id]
                self._unscheduled.discard(output.request_id)
                self._notify_observers(tracked.request_stats(output))
            batches.setdefault(tracked.stream.loop, []).append((tracked.stream, output))
        for loop, items in batches.items():
            _call_soon(loop, _put_all, items)

    def _fail_all(self, error: BaseException) -> None:
        """Hand `error` to every stream and abort every request; each counts as finished with
        reason 'error'."""
        tracked, self._tracked = self._tracked, {}
        self._unscheduled.clear()
        for request_id, t in tracked.items():
            self._notify_observers(t.error_stats(request_id))
        batches: dict[asyncio.AbstractEventLoop, list[tuple[OutputStream, Any]]] = {}
        for t in {id(t.stream): t for t in tracked.values()}.values():
            batches.setdefault(t.stream.loop, []).append((t.stream, error))
        for loop, items in batches.items():
            _call_soon(loop, _put_all, items)
        try:
            self.engine.abort_request(list(tracked))
        except Exception as exc:  # the engine's own state is broken: stop for good
            raise EngineDeadError("could not abort requests after a failed step") from exc

    def _notify_observers(self, stats: RequestStats) -> None:
        for observer in self._observers:
            try:
                observer(stats)
            except Exception:  # metrics must never take the engine down
                logger.exception("request observer %r failed", observer)

    def _publish_stats(self) -> None:
        core = self.engine.engine_core.stats()
        kv = core.kv_cache
        self.stats = EngineStats(
            num_running=core.num_running,
            num_waiting=core.num_waiting,
            num_free_blocks=kv.num_free_blocks,
            num_blocks=kv.num_blocks,
            num_steps=core.num_steps,
            max_batch_size=self._max_batch_size,
            num_loop_turns=self._turns,
            kv_cache=kv,
            engine_core_pid=getattr(self.engine.engine_core, "pid", None),
            worker_pids=self.engine.engine_core.worker_pids,
            max_loras=self.engine.args.max_loras if self.engine.args.enable_lora else 0,
            running_loras=core.running_loras,
            waiting_loras=core.waiting_loras,
            spec_decoding=core.spec_decoding,
            published_at=time.time(),
        )

    def _stop(self) -> None:
        """On the way out: end every stream and answer every pending command."""
        with self._wakeup:
            self._inbox.stopping = True
            pending, self._inbox.commands = self._inbox.commands, []
        for command in pending:
            command.reply(error=EngineDeadError("the engine is shutting down"))
        if self._dead is None:
            try:
                self._abort(list(self._tracked))
            except Exception:
                logger.exception("could not abort the requests left at shutdown")
        self._fail_all_quietly(EngineDeadError("the engine has stopped"))
        self._publish_stats()
        try:
            self.engine.shutdown()  # worker and core processes, if any
        except Exception:
            logger.exception("could not shut the engine down cleanly")

    def _fail_all_quietly(self, error: BaseException) -> None:
        with contextlib.suppress(EngineDeadError):
            self._fail_all(error)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled while waiting
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _put_all(items: list[tuple[OutputStream, Any]]) -> None:
    for stream, item in items:
        stream._put(item)


def _call_soon(loop: asyncio.AbstractEventLoop | None, fn: Callable, *args: Any) -> None:
    if loop is None:
        return
    # RuntimeError: the loop has closed, so nobody is waiting for this any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)
