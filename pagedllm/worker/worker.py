"""Worker: everything device-side for one rank.

It loads the model, plans memory, allocates the KV cache (and the host swap space), captures the
CUDA graphs and owns the ModelRunner. An executor (pagedllm/executor/) drives it in three calls:

    plan = worker.determine_num_blocks()   how many KV blocks (and host swap blocks) fit
    worker.initialize_cache(plan)          allocate them, build the runner, capture graphs
    worker.execute(scheduler_output)       one step: copies, swaps, forward, sample

Nothing above worker/ touches torch: the engine core sees only the plain records that cross the
step (core/step_io.py) and the KVCachePlan below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pagedllm.attention import get_attention_backend
from pagedllm.attention.kv_quant import KVScales, cache_dtype
from pagedllm.config import EngineArgs
from pagedllm.core.step_io import ModelRunnerOutput, SchedulerOutput
from pagedllm.distributed.parallel_state import init_distributed, pp_group, tp_group
from pagedllm.logger import init_logger
from pagedllm.lora.manager import LoRAManager
from pagedllm.lora.model import wrap_model
from pagedllm.model.layers.pooler import Pooler
from pagedllm.model.loader import ModelConfig, load_model, load_model_config
from pagedllm.model.pipeline import this_stage
from pagedllm.spec_decode import make_proposer
from pagedllm.utils import GiB
from pagedllm.worker.cuda_graph import capture_sizes
from pagedllm.worker.draft_runner import DraftRunner
from pagedllm.worker.kv_cache import (
    KVCacheShape,
    allocate_kv_caches,
    describe_plan,
    kv_cache_budget,
    weight_bytes,
)
from pagedllm.worker.memory_plan import GpuMemoryPlan, plan_gpu_memory
from pagedllm.worker.model_runner import ModelRunner
from pagedllm.worker.pooling_runner import PoolingRunner
from pagedllm.worker.swap import SwapSpace

logger = init_logger(__name__)


@dataclass(slots=True)
class KVCachePlan:
    """What the worker's memory holds, in blocks; the engine core builds its block pools on it."""

    block_size: int
    num_blocks: int  # device KV blocks
    bytes_per_block: int
    num_host_blocks: int = 0  # swap space (preemption_mode="swap"), else 0


class Worker:
    def __init__(self, args: EngineArgs, rank: int = 0, init_method: str | None = None) -> None:
        """`init_method`: where the ranks meet (tcp://addr:port) when there are several."""
        self.args = args
        self.rank = rank
        self.device = rank_device(resolve_device(args.device), rank, args.world_size)
        if ":" in self.device:
            torch.cuda.set_device(self.device)  # graphs capture on the current device
        if args.world_size > 1:  # before the model is built: its layers ask for their rank
            share_cpu_threads(self.device, args.world_size)
            init_distributed(rank, args.tensor_parallel_size, args.pipeline_parallel_size,
                             init_method, self.device, args.distributed_timeout)
        self.model_config: ModelConfig = load_model_config(
            args.model, args.dtype, args.max_model_len, args.revision, self.device,
            args.quantization, args.runner, args.pooler_overrides)
        self._check_quantization_splits()
        self._check_pooling()
        self.model, self._weights_bytes = self._load_model()
        self.lora_manager = self._wrap_lora() if args.enable_lora else None
        on_cuda = self.device.startswith("cuda")
        # Decode steps replay CUDA graphs at these batch sizes; none on the CPU or when eager.
        # Nor with LoRA: each step's adapter slots are chosen in Python, which a graph would
        # replay as captured.
        # Nor under pipeline parallelism: a stage's step sends and receives activations.
        # Nor for a pooling model, whose steps are whole prompts, never decodes.
        eager = (args.enforce_eager or args.enable_lora or args.pipeline_parallel_size > 1
                 or self.model_config.runner == "pooling")
        self.cuda_graph_sizes = ([] if not on_cuda or eager else
                                 capture_sizes(args.max_num_seqs, args.max_num_batched_tokens))
        self.kv_shape = KVCacheShape.from_config(
            self.model_config.hf_config, args.block_size,
            cache_dtype(args.kv_cache_dtype, self.model_config.dtype), args.tensor_parallel_size,
            this_stage(self.model_config.hf_config.num_hidden_layers).num_layers)
        self._prepare_kv_scales()
        self.draft_model, self.draft_kv_shape = self._load_draft()
        self.memory_plan: GpuMemoryPlan | None = None
        self.runner: ModelRunner | None = None  # built by initialize_cache
        self.cuda_graph_capture_s = 0.0

    def _check_pooling(self) -> None:
        """A pooling model runs on one rank (its encoders and heads do not split)."""
        if self.model_config.runner == "pooling" and self.args.world_size > 1:
            raise ValueError("a pooling model (runner 'pooling') runs on one rank: tensor and "
                             "pipeline parallelism are not supported for it yet")

    def _check_quantization_splits(self) -> None:
        """Quantized layers do not split across tensor-parallel ranks yet: a GGUF file served
        by default is dequantized at load instead (said in the log); any other quantized
        checkpoint, or quantization="gguf" asked for, is refused."""
        method = self.model_config.quantization
        if self.args.tensor_parallel_size == 1 or method is None:
            return
        if method.name == "gguf" and self.args.quantization is None:
            if self.rank == 0:
                logger.info("tensor parallelism: the GGUF weights are dequantized to %s at load "
                            "(quantized layers do not split across ranks yet)",
                            str(self.model_config.dtype).removeprefix("torch."))
            self.model_config.quantization = None
            return
        raise ValueError(f"tensor_parallel_size > 1 with {method.name} weights is not supported "
                         f"yet (quantized layers do not split across ranks)")

    def _load_model(self) -> tuple[torch.nn.Module, int]:
        """The model, and the device memory its weights took (0 on the CPU)."""
        on_cuda = self.device.startswith("cuda")
        before = torch.cuda.memory_allocated(self.device) if on_cuda else 0
        model = load_model(self.model_config, get_attention_backend(self.device), self.device,
                           self.args.load_format)
        after = torch.cuda.memory_allocated(self.device) if on_cuda else 0
        return model, after - before

    def _load_draft(self) -> tuple[torch.nn.Module | None, KVCacheShape | None]:
        """speculative_config's draft model and the shape of its KV pool (None, None
        without one). It must share the target's vocabulary: its token ids are verified
        against the target's distribution."""
        spec = self.args.speculative_config
        if spec is None or spec.model is None:
            return None, None
        config = load_model_config(spec.model, self.args.dtype, self.model_config.max_model_len,
                                   None, self.device)
        if config.vocab_size != self.model_config.vocab_size:
            raise ValueError(f"speculative_config: the draft model's vocabulary "
                             f"({config.vocab_size} tokens) is not the target's "
                             f"({self.model_config.vocab_size}); they must share one")
        model = load_model(config, get_attention_backend(self.device), self.device,
                           self.args.load_format)
        shape = KVCacheShape.from_config(config.hf_config, self.args.block_size,
                                         cache_dtype(self.args.kv_cache_dtype, config.dtype))
        logger.info("draft model %s: %d layers, weights %.1f MiB", spec.model,
                    shape.num_layers, weight_bytes(model) / 2**20)
        return model, shape

    @property
    def bytes_per_block(self) -> int:
        """One block id's bytes: the target's K/V, and the draft's (same block tables)."""
        draft = self.draft_kv_shape.bytes_per_block if self.draft_kv_shape else 0
        return self.kv_shape.bytes_per_block + draft

    def _draft_runner(self, num_blocks: int) -> DraftRunner | None:
        """The draft model's runner, its KV pool addressed by the target's block tables."""
        if self.draft_model is None:
            return None
        return DraftRunner(self.draft_model,
                           allocate_kv_caches(self.draft_kv_shape, num_blocks, self.device),
                           self.args.speculative_config.num_speculative_tokens,
                           self.model_config.max_model_len)

    def _wrap_lora(self) -> LoRAManager:
        """Rewrite the projections as LoRA layers; the front-end checks adapters against the
        modules they offer (model_config.lora_modules)."""
        args, dtype = self.args, self.model_config.dtype
        on_cuda = self.device.startswith("cuda")
        before = torch.cuda.memory_allocated(self.device) if on_cuda else 0
        lora_model = wrap_model(self.model, args.max_loras, args.max_lora_rank, dtype,
                                self.device)
        if on_cuda:  # the slots are weights as far as the memory plan is concerned
            self._weights_bytes += torch.cuda.memory_allocated(self.device) - before
        self.model_config.lora_modules = dict(lora_model.modules)
        logger.info("LoRA: %d layers, %d slots of rank %d, %d adapters kept in host memory",
                    len(lora_model.layers), args.max_loras, args.max_lora_rank,
                    args.max_cpu_loras)
        return LoRAManager(lora_model, args.max_loras, args.max_cpu_loras, args.max_lora_rank,
                           dtype, self.device)

    def _prepare_kv_scales(self) -> None:
        """Each layer's KV scales on the model's device; with calculate_kv_scales, armed to take
        the first batch's values (replacing any the checkpoint had)."""
        for module in self.model.modules():
            scales = getattr(module, "kv_scales", None)
            if isinstance(scales, KVScales):
                scales.to(self.device)
                scales.calculate = self.args.calculate_kv_scales

    # ---- the three calls ------------------------------------------------------------------------
    def determine_num_blocks(self) -> KVCachePlan:
        """The KV blocks that fit: the user's byte budget (the CPU's default without one), or on
        CUDA what the memory plan leaves after weights, activations and graphs."""
        args = self.args
        if args.kv_cache_memory_bytes is None and self.device.startswith("cuda"):
            self.memory_plan = plan_gpu_memory(
                self.model, self.kv_shape, self._weights_bytes, args.gpu_memory_utilization,
                args.max_num_batched_tokens, args.max_num_seqs, self.model_config.max_model_len,
                self.cuda_graph_sizes, torch.device(self.device))
            logger.info(self.memory_plan.describe())
            budget = self.memory_plan.kv_cache
        else:
            budget = kv_cache_budget(args.kv_cache_memory_bytes)
        per_block = self.bytes_per_block
        num_blocks = budget // per_block
        if num_blocks < 1:
            hint = (" (raise gpu_memory_utilization, or lower max_num_batched_tokens or "
                    "max_num_seqs)" if self.memory_plan else "")
            raise ValueError(f"KV-cache memory of {budget} bytes holds no block; one block needs "
                             f"{per_block} bytes{hint}")
        plan = describe_plan(self.kv_shape, num_blocks, self.model_config.max_model_len,
                             weight_bytes(self.model))
        logger.info(f"rank {self.rank}: {plan}" if self.args.world_size > 1 else plan)
        return KVCachePlan(args.block_size, num_blocks, per_block, self._num_host_blocks())

    def _num_host_blocks(self) -> int:
        if self.args.preemption_mode != "swap":
            return 0
        per_block = self.kv_shape.bytes_per_block
        num_blocks = int(self.args.swap_space * GiB) // per_block
        if num_blocks < 1:
            raise ValueError(f"swap_space of {self.args.swap_space} GiB holds no KV block; one "
                             f"block needs {per_block} bytes")
        logger.info("swap space: %d host blocks (%.2f GiB)", num_blocks,
                    num_blocks * per_block / GiB)
        return num_blocks

    def initialize_cache(self, plan: KVCachePlan) -> None:
        kv_caches = allocate_kv_caches(self.kv_shape, plan.num_blocks, self.device)
        swap_space = SwapSpace(kv_caches, plan.num_host_blocks) if plan.num_host_blocks else None
        if self.model_config.runner == "pooling":
            runner_class = PoolingRunner
            extra = {"pooler": Pooler(self.model, self.model_config.pooler_config)}
        else:
            runner_class = ModelRunner
            extra = {"proposer": make_proposer(self.args.speculative_config),
                     "draft": self._draft_runner(plan.num_blocks)}
        self.runner = runner_class(self.model, kv_caches, plan.block_size, self.device,
                                   self.args.seed, self.model_config.vocab_size, swap_space,
                                   self.lora_manager,
                                   samples=tp_group().is_first and pp_group().is_last, **extra)
        if self.cuda_graph_sizes:
            self.cuda_graph_capture_s = self._capture_cuda_graphs()

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

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(scheduler_output)

    def parallel_stats(self) -> dict:
        """This rank's place, the weight bytes and KV heads it holds, and the time it has spent
        in tensor-parallel collectives so far (for benchmarks, through collective_rpc)."""
        tp = tp_group()
        return {"rank": self.rank, "tp_rank": tp.rank, "tp_size": tp.size,
                "stage": pp_group().rank, "kv_layers": self.kv_shape.num_layers,
                "weight_bytes": weight_bytes(self.model), "kv_heads": self.kv_shape.num_kv_heads,
                "collective_calls": tp.collective_calls,
                "collective_seconds": tp.collective_seconds,
                "pipeline_seconds": pp_group().collective_seconds}


def share_cpu_threads(device: str, world_size: int) -> None:
    """Ranks on one CPU split its cores (torch would give each rank all of them, and ranks that
    wait for each other in every collective would then fight over the cores). OMP_NUM_THREADS,
    when set, is the user's choice per rank and stays."""
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, torch.get_num_threads() // world_size))


def rank_device(device: str, rank: int, world_size: int) -> str:
    """Each rank's own GPU (cuda:rank) under parallelism; the CPU is shared."""
    if world_size == 1 or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise ValueError(f"device {device!r} names one GPU; {world_size} ranks take cuda:0 to "
                         f"cuda:{world_size - 1}: pass device='cuda'")
    if torch.cuda.device_count() < world_size:
        raise ValueError(f"{world_size} ranks need {world_size} GPUs; this machine has "
                         f"{torch.cuda.device_count()}")
    return f"cuda:{rank}"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but no CUDA GPU is available "
                         f"(torch {torch.__version__}); use device='cpu' or 'auto'")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    return device
