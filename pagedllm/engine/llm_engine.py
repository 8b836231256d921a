"""LLMEngine: one step = schedule -> run the model -> update requests -> deliver outputs."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from pagedllm.attention import get_attention_backend
from pagedllm.config import CacheConfig, EngineArgs, SchedulerConfig
from pagedllm.core.block_pool import BlockPool
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.stats import KVCacheStats
from pagedllm.core.step_io import EngineCoreOutput
from pagedllm.engine.beam_ranking import BeamSearchParams
from pagedllm.engine.beam_search import BeamSearchManager
from pagedllm.engine.beam_search import step_params as beam_step_params
from pagedllm.engine.input_processor import Processor
from pagedllm.engine.output_processor import OutputProcessor, sequence_id
from pagedllm.inputs import PromptType
from pagedllm.logger import init_logger
from pagedllm.model.loader import ModelSource, load_model, load_model_config
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.structured_output.manager import StructuredOutputManager
from pagedllm.tokenizer import load_tokenizer
from pagedllm.worker.cuda_graph import capture_sizes
from pagedllm.worker.kv_cache import (
    KVCacheShape,
    allocate_kv_caches,
    describe_plan,
    kv_cache_budget,
)
from pagedllm.worker.memory_plan import GiB, GpuMemoryPlan, plan_gpu_memory
from pagedllm.worker.model_runner import ModelRunner
from pagedllm.worker.swap import SwapSpace

logger = init_logger(__name__)

# A step with nothing to run while grammars compile waits this long for one, instead of
# spinning (and slowing the compiling thread); short, so adds and aborts are not held up.
GRAMMAR_WAIT_S = 0.02
# Any of these next to config.json means the folder has a tokenizer of its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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
    num_free_blocks: int
    duration_s: float
    num_allocated_slots: int = 0  # KV slots of blocks in use after the step
    num_empty_slots: int = 0  # of those, slots holding no token (see KVCacheStats)
    num_swapped_out_blocks: int = 0
    num_swapped_in_blocks: int = 0

    @property
    def waste_fraction(self) -> float:
        return self.num_empty_slots / self.num_allocated_slots if self.num_allocated_slots else 0.0


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        started = time.perf_counter()
        self.args = args
        self.device = _resolve_device(args.device)
        on_cuda = self.device.startswith("cuda")
        if ":" in self.device:
            torch.cuda.set_device(self.device)  # graphs capture on the current device
        self.model_config = load_model_config(args.model, args.dtype, args.max_model_len,
                                              args.revision, self.device)
        self.tokenizer = self._load_tokenizer()
        model, weights_bytes = self._load_model()
        # Decode steps replay CUDA graphs at these batch sizes; none on the CPU or when eager.
        self.cuda_graph_sizes = ([] if not on_cuda or args.enforce_eager else
                                 capture_sizes(args.max_num_seqs, args.max_num_batched_tokens))
        self.memory_plan: GpuMemoryPlan | None = None
        self.cache_config = self._plan_kv_cache(model, weights_bytes)
        kv_caches = allocate_kv_caches(self.kv_shape, self.cache_config.num_blocks, self.device)
        swap_space = self._plan_swap_space(kv_caches)
        self.runner = ModelRunner(model, kv_caches, args.block_size, self.device, args.seed,
                                  self.model_config.vocab_size, swap_space)
        self.cuda_graph_capture_s = self._capture_cuda_graphs() if self.cuda_graph_sizes else 0.0
        self.block_pool = BlockPool(self.cache_config.num_blocks, args.enable_prefix_caching)
        self.host_block_pool = (BlockPool(swap_space.num_blocks, enable_caching=False)
                                if swap_space else None)
        self.kv_cache_manager = KVCacheManager(self.block_pool, args.block_size,
                                               self.host_block_pool)
        max_len = self.model_config.max_model_len
        self.scheduler = Scheduler(
            SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, max_len,
                            args.long_prefill_token_threshold, args.preemption_mode,
                            args.scheduling_policy),
            self.kv_cache_manager)
        self.processor = Processor(self.tokenizer, self.model_config.vocab_size, max_len,
                                   self.cache_config.num_blocks * args.block_size,
                                   self.model_config.eos_token_ids)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.structured_output = StructuredOutputManager(self.tokenizer,
                                                         self.model_config.vocab_size,
                                                         self.model_config.eos_token_ids)
        self.runner.mask_logits = self.structured_output.mask_logits
        self.beam_search = BeamSearchManager(self.scheduler, self.tokenizer,
                                             self.processor.eos_token_id)
        self.step_records: deque[StepRecord] = deque(maxlen=100_000)
        self.num_steps = 0
        self.startup_seconds = time.perf_counter() - started
        logger.info("engine ready in %.1f s: %s (%s, %s)", self.startup_seconds,
                    self.model_config.source.path.name, self.model_config.dtype, self.device)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    def _load_tokenizer(self):
        args = self.args
        if args.skip_tokenizer_init:
            return None
        if (args.load_format == "dummy" and args.tokenizer is None
                and not _has_tokenizer(self.model_config.source)):
            logger.warning("%s has no tokenizer: running on token ids only, as with "
                           "skip_tokenizer_init (give one with tokenizer=...)",
                           self.model_config.source.path)
            return None
        return load_tokenizer(self.model_config.source, args.tokenizer, args.revision)

    def _load_model(self) -> tuple[torch.nn.Module, int]:
        """The model, and the device memory its weights took (0 on the CPU)."""
        on_cuda = self.device.startswith("cuda")
        before = torch.cuda.memory_allocated(self.device) if on_cuda else 0
        model = load_model(self.model_config, get_attention_backend(self.device), self.device,
                           self.args.load_format)
        after = torch.cuda.memory_allocated(self.device) if on_cuda else 0
        return model, after - before

    def _plan_kv_cache(self, model: torch.nn.Module, weights_bytes: int) -> CacheConfig:
        args = self.args
        self.kv_shape = KVCacheShape.from_config(self.model_config.hf_config, args.block_size,
                                                 self.model_config.dtype)
        if args.kv_cache_memory_bytes is None and self.device.startswith("cuda"):
            self.memory_plan = plan_gpu_memory(
                model, self.kv_shape, weights_bytes, args.gpu_memory_utilization,
                args.max_num_batched_tokens, args.max_num_seqs, self.model_config.max_model_len,
                self.cuda_graph_sizes, torch.device(self.device))
            logger.info(self.memory_plan.describe())
            budget = self.memory_plan.kv_cache
        else:
            budget = kv_cache_budget(args.kv_cache_memory_bytes)
        num_blocks = budget // self.kv_shape.bytes_per_block
        if num_blocks < 1:
            hint = (" (raise gpu_memory_utilization, or lower max_num_batched_tokens or "
                    "max_num_seqs)" if self.memory_plan else "")
            raise ValueError(f"KV-cache memory of {budget} bytes holds no block; one block needs "
                             f"{self.kv_shape.bytes_per_block} bytes{hint}")
        logger.info(describe_plan(self.kv_shape, num_blocks, self.model_config.max_model_len))
        return CacheConfig(args.block_size, num_blocks, self.kv_shape.bytes_per_block)

    def _capture_cuda_graphs(self) -> float:
        """Capture the decode graphs and report their time and memory (measured, beside the
        plan's estimate)."""
        sizes = self.cuda_graph_sizes
        free_before = torch.cuda.mem_get_info(self.device)[0]
        seconds = self.runner.capture_decode_graphs(sizes, self.model_config.max_model_len)
        torch.cuda.empty_cache()  # the eager warm-ups' cached blocks are not the graphs'
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        estimate = (f", estimated {self.memory_plan.cuda_graphs / GiB:.2f} GiB"
                    if self.memory_plan else "")
        logger.info("CUDA graphs: captured %d decode batch sizes (1 to %d) in %.1f s; they "
                    "take %.2f GiB%s", len(sizes), sizes[-1], seconds, used / GiB, estimate)
        return seconds

    def _plan_swap_space(self, kv_caches) -> SwapSpace | None:
        if self.args.preemption_mode != "swap":
            return None
        num_blocks = int(self.args.swap_space * 2**30) // self.kv_shape.bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"swap_space of {self.args.swap_space} GiB holds no KV block; one "
                             f"block needs {self.kv_shape.bytes_per_block} bytes")
        logger.info("swap space: %d host blocks (%.2f GiB)", num_blocks,
                    num_blocks * self.kv_shape.bytes_per_block / 2**30)
        return SwapSpace(kv_caches, num_blocks)

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType,
                    params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0) -> None:
        """Validate and queue a request; raises ValueError with the reason if it is bad.
        `priority` orders the waiting queue under scheduling_policy="priority" (lower first)."""
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        request, text = self.processor.process(request_id, prompt, params, arrival_time)
        request.priority = priority
        best_of = request.sampling_params.best_of
        request.pending_fork_ids = [sequence_id(request_id, i) for i in range(1, best_of)]
        if request.sampling_params.structured_outputs is not None:
            self._start_grammar(request)
        self.scheduler.add_request(request)
        self.output_processor.add_request(request_id, text, request.prompt_token_ids,
                                          request.sampling_params, request.arrival_time)

    def _start_grammar(self, request: Request) -> None:
        """Parse the request's constraint (ValueError if bad) and compile it off the step loop;
        until it has compiled, the scheduler passes the request over."""
        if request.request_id in self.scheduler.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        sequence_ids = [request.request_id, *request.pending_fork_ids]
        ready = self.structured_output.add_request(request.request_id, sequence_ids,
                                                   request.sampling_params.structured_outputs)
        request.waiting_for_grammar = not ready

    def add_beam_search(self, request_id: str, prompt: PromptType, params: BeamSearchParams,
                        arrival_time: float | None = None, priority: int = 0) -> None:
        """Queue a beam search (engine/beam_search.py); its one RequestOutput comes when it ends, with
        the beams best first as `outputs`."""
        first_id = f"{request_id}#beam0"
        request, text = self.processor.process(first_id, prompt, beam_step_params(params),
                                               arrival_time)
        request.priority = priority
        self.beam_search.start(request_id, text, request.prompt_token_ids, params, first_id)
        self.scheduler.add_request(request)

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.beam_search.abort(ids)
        sequence_ids = self.output_processor.abort(ids)
        self.scheduler.finish_requests(ids + sequence_ids, RequestStatus.FINISHED_ABORTED)
        self.structured_output.remove(ids + sequence_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self.scheduler.requests)

    def kv_cache_stats(self) -> KVCacheStats:
        """KV-cache usage, waste (empty slots of allocated blocks), prefix-cache queries and
        hits, preemptions and swaps: a snapshot of plain numbers, safe to hand to another
        thread."""
        return self.scheduler.kv_cache_stats()

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        failed = self._start_compiled_grammars() if self.structured_output.has_pending else []
        scheduler_output = self.scheduler.schedule()
        if not scheduler_output.scheduled and self.structured_output.has_pending:
            self.structured_output.wait_for_compile(GRAMMAR_WAIT_S)
        self.structured_output.start_bitmask(scheduler_output.scheduled)  # while the model runs
        runner_output = self.runner.execute(scheduler_output)
        core_outputs = failed + self.scheduler.update_from_output(scheduler_output, runner_output)
        self._end_by_grammar(core_outputs)
        self.output_processor.add_prompt_logprobs(runner_output.prompt_logprobs)
        beams = [o for o in core_outputs if self.beam_search.owns(o.request_id)]
        if beams:
            core_outputs = [o for o in core_outputs if not self.beam_search.owns(o.request_id)]
        outputs, stopped = self.output_processor.process(core_outputs)
        self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        if self.structured_output.active:
            ended = [o.request_id for o in core_outputs if o.finish_reason is not None]
            self.structured_output.remove(ended + stopped)
        outputs += self.beam_search.process(beams)
        self._record(scheduler_output, time.perf_counter() - started)
        return outputs

    def _start_compiled_grammars(self) -> list[EngineCoreOutput]:
        """Let the requests whose grammar has compiled be scheduled; a compile that failed
        (which parsing should have caught) ends its request's sequences with 'abort'."""
        polled = self.structured_output.poll()
        for request_id in polled.ready:
            request = self.scheduler.requests.get(request_id)
            if request is not None:
                request.waiting_for_grammar = False
        outputs = []
        for request_id, sequence_ids in polled.failed.items():
            self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
            outputs += [EngineCoreOutput(s, [], [], finish_reason="abort") for s in sequence_ids]
        return outputs

    def _end_by_grammar(self, core_outputs: list[EngineCoreOutput]) -> None:
        """Advance the grammars by this step's tokens. A terminated grammar ends its request
        with "stop" (even under ignore_eos); a token the grammar rejects (possible only when
        other constraints left no legal token) is dropped, and the request stops there."""
        verdicts = self.structured_output.accept_tokens(core_outputs)
        if not verdicts:
            return
        by_id = {o.request_id: o for o in core_outputs}
        for verdict in verdicts:
            output = by_id[verdict.request_id]
            if verdict.rejected:
                output.new_token_ids, output.new_logprobs = [], []
            if output.finish_reason is None:
                output.finish_reason = "stop"
                self.scheduler.finish_requests([verdict.request_id],
                                               RequestStatus.FINISHED_STOPPED)

    def _record(self, scheduler_output, duration: float) -> None:
        if not scheduler_output.scheduled:
            return
        self.num_steps += 1
        self.step_records.append(StepRecord(
            step=self.num_steps,
            scheduled={s.request_id: len(s.token_ids) for s in scheduler_output.scheduled},
            num_prefill_tokens=scheduler_output.num_prefill_tokens,
            num_decode_tokens=scheduler_output.num_decode_tokens,
            preempted=list(scheduler_output.preempted_request_ids),
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_free_blocks=self.block_pool.num_free_blocks,
            duration_s=duration,
            num_allocated_slots=(self.block_pool.num_blocks - self.block_pool.num_free_blocks)
            * self.cache_config.block_size,
            num_empty_slots=self.kv_cache_manager.num_empty_slots(self.scheduler.running),
            num_swapped_out_blocks=len(scheduler_output.blocks_to_swap_out),
            num_swapped_in_blocks=len(scheduler_output.blocks_to_swap_in),
        ))


def _has_tokenizer(source: ModelSource) -> bool:
    """A GGUF file carries its vocabulary; a folder needs tokenizer files of its own."""
    return source.is_gguf or any((source.path / name).is_file() for name in TOKENIZER_FILES)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but no CUDA GPU is available "
                         f"(torch {torch.__version__}); use device='cpu' or 'auto'")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    return device
