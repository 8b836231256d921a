"""EngineCore: one step = schedule -> execute -> update, over requests that are already processed.

    front-end (LLMEngine, AsyncLLM)            EngineCore
    ---------------------------------          -------------------------------------------------
    prompt -> Request (input_processor) -----> add_request / add_beam_search / abort_requests
                                               step():
                                                 features.before_schedule()
                                                 scheduler.schedule()     -> SchedulerOutput
                                                 features.on_scheduled()     (grammar bitmask)
                                                 executor.execute()      -> ModelRunnerOutput
                                                 scheduler.update_from_output()
                                                 features.after_update()     (grammars, beams)
    detokenize, stop strings, n > 1  <-------- EngineCoreOutputs (plain data: token ids, stats)
    (output_processor); stop strings end
    sequences through finish_requests

The core knows nothing of text (the tokenizer it holds is for grammars and beam texts), and
touches no tensor: the executor's workers do. It may run in the front-end's process (LLMEngine,
and AsyncLLM by default) or in its own (engine/core_process.py), where it shares neither the GIL
nor an OpenMP team with the HTTP server.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagedllm.config import EngineArgs, SchedulerConfig
from pagedllm.core.block_pool import BlockPool
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.snapshot import EngineSnapshot, take_snapshot
from pagedllm.core.stats import KVCacheStats, SpecDecodingStats, count_by_position
from pagedllm.core.step_io import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from pagedllm.engine.beam_ranking import BeamSearchParams
from pagedllm.engine.beam_search import BeamSearchManager
from pagedllm.engine.features import StepFeature
from pagedllm.executor import Executor, create_executor
from pagedllm.logger import init_logger
from pagedllm.outputs import RequestOutput
from pagedllm.structured_output.manager import StructuredOutputManager
from pagedllm.structured_output.step import StructuredOutputStep
from pagedllm.tokenizer import load_engine_tokenizer

logger = init_logger(__name__)

UNSET: Any = object()  # "load the tokenizer yourself" (None means: run without one)


@dataclass(slots=True)
class InFlightStep:
    """A step submitted to the executor whose result the core has not taken yet."""

    scheduler_output: SchedulerOutput
    result: Callable[[], ModelRunnerOutput]  # waits for the step's result
    started: float  # perf_counter() when it was scheduled


def carries_work(scheduler_output: SchedulerOutput) -> bool:
    """Does a step with no row still have something for the workers (finished requests to
    forget, block copies or swaps to make) or for the engine (rows that failed)?"""
    return bool(scheduler_output.finished_request_ids or scheduler_output.block_copies
                or scheduler_output.blocks_to_swap_out or scheduler_output.blocks_to_swap_in
                or scheduler_output.preempted_request_ids or scheduler_output.failed)


@dataclass(slots=True)
class StepRecord:
    """What one step did; kept so that tests and benchmarks can see batching happen."""

    step: int
    scheduled: dict[str, int]  # request id -> tokens computed this step
    num_prefill_tokens: int
    num_decode_tokens: int
    preempted: list[str]
    num_running: int
    num_waiting: int
    duration_s: float
    kv_cache: KVCacheStats  # after the step: usage, waste, prefix-cache hits, swaps
    num_swapped_out_blocks: int = 0
    num_swapped_in_blocks: int = 0
    loras: list[str] = field(default_factory=list)  # the distinct LoRA adapters it ran
    # speculative decoding: sequences that verified drafts, their draft tokens per position
    # (index i: sequences with an (i+1)-th draft) and of those, the accepted ones
    spec_drafts_per_position: list[int] = field(default_factory=list)
    spec_accepted_per_position: list[int] = field(default_factory=list)

    @property
    def spec_acceptance_per_position(self) -> list[float]:
        return [a / d for a, d in zip(self.spec_accepted_per_position,
                                      self.spec_drafts_per_position)]

    @property
    def num_free_blocks(self) -> int:
        return self.kv_cache.num_free_blocks

    @property
    def num_allocated_slots(self) -> int:
        return self.kv_cache.num_allocated_slots

    @property
    def num_empty_slots(self) -> int:
        return self.kv_cache.num_empty_slots

    @property
    def waste_fraction(self) -> float:
        return self.kv_cache.waste_fraction


@dataclass(slots=True, frozen=True)
class CoreStats:
    """The scheduler's queues and the KV cache after a step or a command: plain numbers."""

    num_running: int
    num_waiting: int
    num_steps: int
    kv_cache: KVCacheStats
    # the LoRA adapters (names) of the running and of the waiting requests (enable_lora)
    running_loras: tuple[str, ...] = ()
    waiting_loras: tuple[str, ...] = ()
    spec_decoding: SpecDecodingStats | None = None  # a copy; None when speculation is off


@dataclass(slots=True)
class EngineCoreOutputs:
    """What one step hands back to the front-end."""

    outputs: list[EngineCoreOutput]  # one per sequence that sampled (or ended) this step
    stats: CoreStats
    # request id -> (position of the first entry, logprobs of each following prompt token)
    prompt_logprobs: dict[str, tuple[int, list]] = field(default_factory=dict)
    finished_searches: list[RequestOutput] = field(default_factory=list)  # beam search results
    record: StepRecord | None = None  # None when the step ran nothing


class EngineCore:
    def __init__(self, args: EngineArgs, tokenizer: Any = UNSET,
                 executor: Executor | None = None) -> None:
        started = time.perf_counter()
        self.args = args
        self.executor = executor or create_executor(args)
        self.model_config = self.executor.model_config
        self.cache_config = self.executor.determine_num_blocks()
        self.executor.initialize_cache(self.cache_config)
        self.tokenizer = (load_engine_tokenizer(args, self.model_config.source)
                          if tokenizer is UNSET else tokenizer)
        self.block_pool = BlockPool(self.cache_config.num_blocks, args.enable_prefix_caching)
        self.host_block_pool = (BlockPool(self.cache_config.num_host_blocks, enable_caching=False)
                                if self.cache_config.num_host_blocks else None)
        self.kv_cache_manager = KVCacheManager(self.block_pool, args.block_size,
                                               self.host_block_pool)
        self.scheduler = Scheduler(
            SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens,
                            self.model_config.max_model_len, args.long_prefill_token_threshold,
                            args.preemption_mode, args.scheduling_policy,
                            args.max_loras if args.enable_lora else 0,
                            args.speculative_config.num_lookahead_tokens
                            if args.speculative_config else 0),
            self.kv_cache_manager)
        self.structured_output = StructuredOutputManager(
            self.tokenizer, self.model_config.vocab_size, self.model_config.eos_token_ids)
        eos = self.model_config.eos_token_ids[0] if self.model_config.eos_token_ids else None
        self.beam_search = BeamSearchManager(self.scheduler, self.tokenizer, eos)
        self.features: list[StepFeature] = [
            StructuredOutputStep(self.structured_output, self.scheduler), self.beam_search]
        self.num_steps = 0
        # since start-up, for the dashboard's rates: prompt tokens computed, tokens sampled
        self.num_prompt_tokens = 0
        self.num_output_tokens = 0
        # pipeline parallelism: up to one step in flight per stage (see _step_pipelined)
        self.pipeline_depth = args.pipeline_parallel_size
        self.in_flight: collections.deque[InFlightStep] = collections.deque()
        self.startup_seconds = time.perf_counter() - started
        if args.speculative_config is not None:
            logger.info(args.speculative_config.describe())

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a processed request; ValueError (and nothing queued) if a feature rejects it."""
        self._check_new_id(request.request_id)
        for feature in self.features:
            feature.on_add(request)
        self.scheduler.add_request(request)

    def add_beam_search(self, request_id: str, prompt: str | None, first: Request,
                        params: BeamSearchParams) -> None:
        """Start a beam search whose first beam is `first` (engine/beam_search.py); its one
        RequestOutput comes in EngineCoreOutputs.finished_searches when it ends."""
        if self.args.speculative_config is not None:
            raise ValueError("beam search is not supported with speculative decoding "
                             "(speculative_config): each beam must advance one token per step")
        self._check_new_id(request_id)
        self._check_new_id(first.request_id)
        self.beam_search.start(request_id, prompt, first.prompt_token_ids, params,
                               first.request_id)
        self.scheduler.add_request(first)

    def _check_new_id(self, request_id: str) -> None:
        self.scheduler.check_new_id(request_id, also_taken=self.beam_search.owns_search(request_id))

    def abort_requests(self, request_ids: list[str]) -> None:
        """End requests (and beam searches) by id; unknown ids are ignored."""
        self.beam_search.abort(request_ids)
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def abort_all(self) -> None:
        """End every request and beam search (after a failed step)."""
        self.abort_requests(list(self.beam_search.groups) + self.scheduler.unfinished_ids())

    def finish_requests(self, request_ids: list[str],
                        status: RequestStatus = RequestStatus.FINISHED_STOPPED) -> None:
        """End sequences the front-end has finished (a stop string) or dropped."""
        if not request_ids:
            return
        self.scheduler.finish_requests(request_ids, status)
        for feature in self.features:
            feature.on_finished(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished

    def kv_cache_stats(self) -> KVCacheStats:
        return self.scheduler.kv_cache_stats()

    def stats(self) -> CoreStats:
        running, waiting = (self.scheduler.lora_adapters() if self.args.enable_lora
                            else ((), ()))
        spec = self.scheduler.spec_decoding.copy() if self.args.speculative_config else None
        return CoreStats(self.scheduler.num_running, self.scheduler.num_waiting, self.num_steps,
                         self.kv_cache_stats(), tuple(running), tuple(waiting), spec)

    def snapshot(self) -> EngineSnapshot:
        """Every block's state and every unfinished request, for the dashboard (core/snapshot.py);
        taken only when asked, between steps."""
        return take_snapshot(self.scheduler, self.num_steps, self.num_prompt_tokens,
                             self.num_output_tokens)

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        if self.pipeline_depth > 1:
            return self._step_pipelined()
        started = time.perf_counter()
        outputs = [o for feature in self.features for o in feature.before_schedule()]
        scheduler_output = self.scheduler.schedule()
        for feature in self.features:
            feature.on_scheduled(scheduler_output)
        runner_output = self.executor.execute(scheduler_output)
        return self._finish_step(scheduler_output, runner_output, started, outputs)

    def _finish_step(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput,
                     started: float, outputs: list[EngineCoreOutput]) -> EngineCoreOutputs:
        """Update the requests from a step's result and package what the step produced."""
        outputs += self.scheduler.update_from_output(scheduler_output, runner_output)
        self.num_prompt_tokens += scheduler_output.num_prefill_tokens
        self.num_output_tokens += sum(len(o.new_token_ids) for o in outputs)  # beams' too
        for feature in self.features:
            outputs = feature.after_update(outputs)
        if scheduler_output.scheduled:
            self.num_steps += 1
        stats = self.stats()
        record = self._record(scheduler_output, time.perf_counter() - started, stats)
        return EngineCoreOutputs(outputs, stats, runner_output.prompt_logprobs or {},
                                 self.beam_search.take_results(), record)

    def _step_pipelined(self) -> EngineCoreOutputs:
        """Under pipeline parallelism: keep up to one step in flight per stage, so that while
        the last stage finishes step k the first already runs step k + 1 on other requests.

            call:   schedule k+1, submit      (when a stage is free and anything can run)
                    wait for the oldest step, update from it   (when all are busy, or nothing
                                                                new could be scheduled)
        A request in flight is not scheduled again until its step returns (the scheduler's
        in_flight set). Each stage runs the steps in submission order, so KV blocks freed or
        reused between steps are written and read in the same order as on one rank."""
        started = time.perf_counter()
        outputs = [o for feature in self.features for o in feature.before_schedule()]
        submitted = False
        if len(self.in_flight) < self.pipeline_depth:
            scheduler_output = self.scheduler.schedule()
            if scheduler_output.scheduled or not self.in_flight or carries_work(scheduler_output):
                for feature in self.features:
                    feature.on_scheduled(scheduler_output)
                self.in_flight.append(InFlightStep(scheduler_output,
                                                   self.executor.submit(scheduler_output), started))
                submitted = bool(scheduler_output.scheduled)
        if not self.in_flight or (submitted and len(self.in_flight) < self.pipeline_depth):
            return EngineCoreOutputs(outputs, self.stats(), {}, [], None)
        step = self.in_flight.popleft()
        finished = self._finish_step(step.scheduler_output, step.result(), step.started, outputs)
        while self.in_flight and not self.has_unfinished_requests():
            # nothing left to run: settle the steps still out (rows of aborted requests,
            # finished ids), so no reply waits in the pipes for a later call
            rest = self.in_flight.popleft()
            self.scheduler.update_from_output(rest.scheduler_output, rest.result())
        return finished

    def _record(self, scheduler_output: SchedulerOutput, duration: float,
                stats: CoreStats) -> StepRecord | None:
        if not scheduler_output.scheduled:
            return None
        record = StepRecord(
            step=self.num_steps,
            scheduled={s.request_id: len(s.token_ids) for s in scheduler_output.scheduled},
            num_prefill_tokens=scheduler_output.num_prefill_tokens,
            num_decode_tokens=scheduler_output.num_decode_tokens,
            preempted=list(scheduler_output.preempted_request_ids),
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            duration_s=duration,
            kv_cache=stats.kv_cache,
            num_swapped_out_blocks=len(scheduler_output.blocks_to_swap_out),
            num_swapped_in_blocks=len(scheduler_output.blocks_to_swap_in),
            loras=sorted({s.lora_request.lora_name for s in scheduler_output.scheduled
                          if s.lora_request is not None}),
        )
        for num_drafts, num_accepted in self.scheduler.last_step_drafts:
            count_by_position(record.spec_drafts_per_position,
                              record.spec_accepted_per_position, num_drafts, num_accepted)
        return record

    @property
    def worker_pids(self) -> tuple[int, ...]:
        """Worker processes of the executor ("mp"; "ray": each on its node); none when the
        worker runs in this one."""
        return tuple(getattr(self.executor, "worker_pids", ()))

    def ready_to_step(self) -> bool:
        return self.has_unfinished_requests()

    def shutdown(self) -> None:
        self.executor.shutdown()
