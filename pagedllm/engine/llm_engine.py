"""LLMEngine: the offline front-end around EngineCore.

    add_request: prompt -> Request (input_processor: tokenize, validate) -> engine_core
    step():      engine_core.step() -> EngineCoreOutputs -> output_processor (detokenize, stop
                 strings, logprobs, n > 1 fan-in) -> RequestOutputs; sequences a stop string
                 ended are finished in the core

The same front-end serves AsyncLLM, whose engine core may live in another process
(engine/core_process.py): then `engine_core` is a client with the same calls.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from pagedllm.config import EngineArgs
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.stats import KVCacheStats
from pagedllm.engine.beam_ranking import BeamSearchParams
from pagedllm.engine.beam_search import step_params as beam_step_params
from pagedllm.engine.core import EngineCore, EngineCoreOutputs, StepRecord
from pagedllm.engine.input_processor import PoolingSetup, Processor
from pagedllm.engine.output_processor import OutputProcessor, sequence_id
from pagedllm.inputs import PromptType
from pagedllm.logger import init_logger
from pagedllm.lora.registry import LoRARegistry
from pagedllm.lora.request import LoRARequest
from pagedllm.outputs import RequestOutput
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams

logger = init_logger(__name__)

__all__ = ["LLMEngine", "ProcessedInput", "StepRecord"]

MAX_STEP_RECORDS = 10_000


@dataclass(slots=True)
class ProcessedInput:
    """A request the input processor has tokenized and validated, ready to queue. For a beam
    search, `request` is its first beam."""

    request_id: str
    request: Request
    text: str | None  # the prompt text (None for a token-id prompt)
    beam_search: BeamSearchParams | None = None


class LLMEngine:
    def __init__(self, args: EngineArgs, engine_core: Any = None) -> None:
        started = time.perf_counter()
        self.args = args
        self.engine_core = engine_core if engine_core is not None else _start_core(args)
        core = self.engine_core
        self.model_config = core.model_config
        self.cache_config = core.cache_config
        self.tokenizer = core.tokenizer
        max_len = self.model_config.max_model_len
        self.loras = LoRARegistry(args.enable_lora, args.max_lora_rank,
                                  self.model_config.lora_modules)
        self.input_processor = Processor(self.tokenizer, self.model_config.vocab_size, max_len,
                                         self.cache_config.num_blocks * args.block_size,
                                         self.model_config.eos_token_ids, self.loras,
                                         pooling_setup(self.model_config, args))
        self.output_processor = OutputProcessor(self.tokenizer)
        self.searches: set[str] = set()  # beam searches in flight (their results come whole)
        # For /debug/step_stats and benchmarks, which read them as they go. Each record names
        # the requests it ran: ~4.7 KB at 32 running, so 100,000 of them (an earlier cap) grew
        # a server by ~470 MB over two hours of a soak; this many hold the last ~10 minutes.
        self.step_records: deque[StepRecord] = deque(maxlen=MAX_STEP_RECORDS)
        self.last_stats = core.stats()
        self.startup_seconds = time.perf_counter() - started
        logger.info("engine ready in %.1f s: %s (%s)", self.startup_seconds,
                    self.model_config.source.path.name, self.model_config.dtype)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    @property
    def worker(self) -> Any:
        """The in-process worker (distributed_executor_backend="uni"): the model, the runner,
        the memory plan; for tests and profiling."""
        return self.engine_core.executor.worker

    @property
    def num_steps(self) -> int:
        return self.last_stats.num_steps

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType,
                    params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0,
                    lora_request: LoRARequest | None = None) -> None:
        """Validate and queue a request; raises ValueError with the reason if it is bad.
        `priority` orders the waiting queue under scheduling_policy="priority" (lower first);
        `lora_request` names the adapter it runs under (enable_lora)."""
        self.add_processed(self.process_input(request_id, prompt, params, arrival_time, priority,
                                              lora_request=lora_request))

    def add_beam_search(self, request_id: str, prompt: PromptType, params: BeamSearchParams,
                        arrival_time: float | None = None, priority: int = 0,
                        lora_request: LoRARequest | None = None) -> None:
        """Queue a beam search (engine/beam_search.py); its one RequestOutput comes when it
        ends, with the beams best first as `outputs`."""
        self.add_processed(self.process_input(request_id, prompt, params, arrival_time, priority,
                                              lora_request=lora_request))

    def process_input(self, request_id: str, prompt: PromptType,
                      params: SamplingParams | BeamSearchParams | PoolingParams | None = None,
                      arrival_time: float | None = None, priority: int = 0,
                      default_max_tokens: int | None = None,
                      lora_request: LoRARequest | None = None) -> ProcessedInput:
        """Tokenize and validate one request (ValueError if it is bad) without queueing it.
        It reads no engine state but the adapter registry, so AsyncLLM runs it off the engine
        thread; `add_processed` queues the result. A request without max_tokens gets at most
        `default_max_tokens`."""
        _check_priority(priority)
        if isinstance(params, PoolingParams):
            if lora_request is not None:
                raise ValueError("LoRA adapters are not supported for pooling requests")
            request, text = self.input_processor.process_pooling(request_id, prompt, params,
                                                                 arrival_time)
            request.priority = priority
            return ProcessedInput(request_id, request, text)
        if isinstance(params, BeamSearchParams):
            first, text = self.input_processor.process(f"{request_id}#beam0", prompt,
                                                       beam_step_params(params), arrival_time,
                                                       lora_request=lora_request)
        else:
            first, text = self.input_processor.process(request_id, prompt, params, arrival_time,
                                                       default_max_tokens, lora_request)
            best_of = first.sampling_params.best_of
            first.pending_fork_ids = [sequence_id(request_id, i) for i in range(1, best_of)]
        first.priority = priority
        beam = params if isinstance(params, BeamSearchParams) else None
        return ProcessedInput(request_id, first, text, beam)

    def add_processed(self, processed: ProcessedInput) -> None:
        """Queue a request that `process_input` made; ValueError if its id is in use."""
        request_id, request = processed.request_id, processed.request
        self._check_new_id(request_id)
        if processed.beam_search is not None:
            self.engine_core.add_beam_search(request_id, processed.text, request,
                                             processed.beam_search)
            self.searches.add(request_id)
            return
        self.engine_core.add_request(request)
        if request.pooling_params is not None:
            self.output_processor.add_pooling_request(request_id, processed.text,
                                                      request.prompt_token_ids)
            return
        self.output_processor.add_request(request_id, processed.text, request.prompt_token_ids,
                                          request.sampling_params, request.arrival_time)

    def _check_new_id(self, request_id: str) -> None:
        """The one duplicate-id check: a front-end knows every request it has in flight."""
        if request_id in self.output_processor.states or request_id in self.searches:
            raise ValueError(f"request id {request_id!r} is already in use")

    # ---- LoRA adapters --------------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> None:
        """Check an adapter and accept requests under it from now on (ValueError naming what
        is wrong with it). Its weights load in the worker when a step first runs it."""
        self.loras.check(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Refuse new requests under the adapter; those in flight finish. False if unknown."""
        return self.loras.remove(lora_int_id) is not None

    def list_loras(self) -> list[LoRARequest]:
        return list(self.loras.adapters.values())

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.searches.difference_update(ids)
        sequence_ids = self.output_processor.abort(ids)
        self.engine_core.abort_requests(ids + sequence_ids)

    def ready_to_step(self) -> bool:
        """Would step() do something now? (With a core process: has it sent a step?)"""
        return self.engine_core.ready_to_step()

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.states or self.searches)

    def get_num_unfinished_requests(self) -> int:
        """Sequences the core holds (a request with n > 1 counts as n once they have forked)."""
        return self.engine_core.get_num_unfinished_requests()

    def kv_cache_stats(self) -> KVCacheStats:
        """KV-cache usage, waste (empty slots of allocated blocks), prefix-cache queries and
        hits, preemptions and swaps: a snapshot of plain numbers, safe to hand to another
        thread."""
        return self.engine_core.kv_cache_stats()

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        return self.process_outputs(self.engine_core.step())

    def process_outputs(self, core_outputs: EngineCoreOutputs) -> list[RequestOutput]:
        """Turn one step of the core's token ids into RequestOutputs."""
        self.last_stats = core_outputs.stats
        if core_outputs.record is not None:
            self.step_records.append(core_outputs.record)
        self.output_processor.add_prompt_logprobs(core_outputs.prompt_logprobs)
        outputs, stopped = self.output_processor.process(core_outputs.outputs)
        self.engine_core.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        for result in core_outputs.finished_searches:
            self.searches.discard(result.request_id)
        return outputs + core_outputs.finished_searches

    def shutdown(self) -> None:
        self.engine_core.shutdown()


def _start_core(args: EngineArgs) -> Any:
    """The engine core in this process, or (engine_core_process) a client of one in its own."""
    if args.engine_core_process:
        from pagedllm.engine.core_process import CoreProcessClient

        return CoreProcessClient(args)
    return EngineCore(args)


def pooling_setup(model_config: Any, args: EngineArgs) -> PoolingSetup | None:
    """What pooling requests are checked against; None for a generating model."""
    if model_config.runner != "pooling":
        return None
    return PoolingSetup(model_config.pooler_config, model_config.pooling_tasks,
                        model_config.hf_config.hidden_size, model_config.max_model_len,
                        args.max_num_batched_tokens,
                        causal=model_config.causal)


def _check_priority(priority: Any) -> None:
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ValueError(f"priority must be an integer, got {priority!r}")
