"""Engine options: one definition shared by `LLM(...)`, `pagedllm generate` and `pagedllm serve`."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagedllm.pooling_params import RUNNERS, parse_pooler_config

DTYPES = ("auto", "float32", "bfloat16", "float16")
PREEMPTION_MODES = ("recompute", "swap")
SCHEDULING_POLICIES = ("fcfs", "priority")
LOAD_FORMATS = ("auto", "dummy")
EXECUTOR_BACKENDS = ("uni", "mp", "ray")
RAY_MISSING = ("distributed_executor_backend='ray' needs Ray, which is not installed: "
               "pip install 'pagedllm[ray]'")
# the KV cache's element type: auto (the model's dtype) or 8-bit floats; "fp8" is e4m3
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
# what quantization= may name: a method of model/layers/quantization/ (its registry maps each to
# a module), or none (a GGUF file dequantized at load); defined here, where no torch is imported
QUANTIZATION_CHOICES = ("none", "gguf", "awq", "gptq", "compressed-tensors")
LORA_DEFAULTS = {"max_loras": 1, "max_lora_rank": 16, "max_cpu_loras": None}
MAX_LORA_RANK = 512  # vLLM's largest
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
CPU_DEFAULT_KV_CACHE_BYTES = 4 << 30  # vLLM's CPU backend also defaults to 4 GiB


def cache_dir() -> Path:
    """Where pagedllm keeps what it builds once per machine (converted tokenizers, kernels)."""
    return Path(os.environ.get("PAGEDLLM_CACHE_DIR") or Path.home() / ".cache" / "pagedllm")


def parse_bytes(text: str | int) -> int:
    """'4GiB', '512MB', '1e9' or a plain int -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read a memory size from {text!r} (try 4GiB or 512MiB)")
    number, unit, binary = match.groups()
    base = 1024 if binary or unit else 1000
    power = " KMGT".index(unit.upper() or " ")
    return int(float(number) * base**power)


def _opt(help_text: str, default: Any = None, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class EngineArgs:
    model: str | None = _opt("HF folder, .gguf file or hub id (default: bundled SmolLM2-135M)")
    tokenizer: str | None = _opt("tokenizer folder or hub id (default: the model's)")
    revision: str | None = _opt("hub revision to download")
    dtype: str = _opt("weights and activations dtype", "auto", choices=DTYPES)
    device: str = _opt("auto (cuda when a GPU is available, else cpu), cpu, cuda or cuda:N", "auto")
    load_format: str = _opt(
        "auto: the checkpoint's weights; dummy: random weights built from config.json alone, "
        "for benchmarks of real shapes without the checkpoint", "auto", choices=LOAD_FORMATS)
    quantization: str | None = _opt(
        "quantized-weight method (default: what the checkpoint says; a GGUF file is served in "
        "its own types); none: dequantize a GGUF file to dtype at load", choices=QUANTIZATION_CHOICES)
    kv_cache_dtype: str = _opt(
        "KV cache element type: auto (the model's dtype), fp8 (= fp8_e4m3) or fp8_e5m2, which "
        "hold twice the tokens in the same memory", "auto", choices=KV_CACHE_DTYPES)
    calculate_kv_scales: bool = _opt(
        "with an fp8 KV cache, set each layer's K and V scales from the first prompts' values "
        "(default: the checkpoint's k_scale/v_scale, else 1.0)", False)
    seed: int = _opt("seed for requests that do not set their own", 0)
    max_model_len: int | None = _opt("longest prompt + output (default: from the model)")
    block_size: int = _opt("tokens per KV-cache block", 16)
    kv_cache_memory_bytes: int | None = _opt(
        "bytes for the KV cache, e.g. 2GiB (default: 4GiB on CPU)", cli_name="kv-cache-memory",
        parse=parse_bytes, aliases=("--kv-cache-memory-bytes",))  # the alias is vLLM's name
    gpu_memory_utilization: float = _opt(
        "share of the GPU's memory the engine may fill: weights, activations, CUDA graphs and "
        "the KV cache, which gets the rest (CUDA only; ignored with --kv-cache-memory)", 0.9)
    enforce_eager: bool = _opt(
        "run decode steps eagerly instead of replaying CUDA graphs (the CPU always runs eagerly)",
        False)
    max_num_seqs: int = _opt("most sequences running at once", 256)
    max_num_batched_tokens: int = _opt("token budget of one engine step", 2048)
    skip_tokenizer_init: bool = _opt("run on token ids only, without a tokenizer", False)
    enable_prefix_caching: bool = _opt("reuse the KV blocks of prompts seen before", True)
    long_prefill_token_threshold: int = _opt(
        "most prompt tokens one request may compute in a step (0: no cap beyond the budget)", 0)
    preemption_mode: str = _opt(
        "what a preempted request loses: recompute (its KV blocks) or swap (copied to host memory)",
        "recompute", choices=PREEMPTION_MODES)
    swap_space: float = _opt("GiB of host memory for swapped-out KV blocks (preemption_mode=swap)",
                             4.0)
    scheduling_policy: str = _opt("order of the waiting queue: fcfs, or priority (lower first)",
                                  "fcfs", choices=SCHEDULING_POLICIES)
    tensor_parallel_size: int = _opt(
        "ranks each layer is split across (Megatron-style: attention heads, MLP columns and the "
        "vocabulary), one worker process each", 1, aliases=("-tp",))
    pipeline_parallel_size: int = _opt(
        "pipeline stages the decoder layers are split across, one after another, "
        "tensor_parallel_size worker processes each", 1,
        aliases=("-pp",))
    distributed_executor_backend: str | None = _opt(
        "where the workers run: uni (in the engine core's process), mp (one process per "
        "rank) or ray (one Ray actor per rank, on one machine or several); default: uni for "
        "one rank, mp for more", choices=EXECUTOR_BACKENDS)
    distributed_master_addr: str = _opt(
        "address the ranks meet at (torch.distributed's rendezvous, on the driver's machine; "
        "the ray executor uses rank 0's node IP instead)",
        "127.0.0.1")
    distributed_master_port: int = _opt("port of that rendezvous (0: a free port, on rank 0's "
                                        "node under ray)", 0)
    distributed_timeout: float = _opt(
        "seconds a rank waits for the others to join, or in one collective, before failing", 60.0)
    enable_lora: bool = _opt(
        "serve LoRA adapters: requests name one (LoRARequest, or the server's model field) and "
        "requests under different adapters share each step", False)
    max_loras: int = _opt("most distinct LoRA adapters in one step (enable_lora)", 1)
    max_lora_rank: int = _opt("largest LoRA rank an adapter may have; it sizes every adapter "
                              "slot (enable_lora)", 16)
    max_cpu_loras: int | None = _opt(
        "LoRA adapters kept loaded in host memory, least recently used evicted (enable_lora; "
        "default: max_loras)")
    speculative_config: Any = _opt(
        "speculative decoding, as a dict or its JSON text, e.g. '{\"method\": \"ngram\", "
        "\"num_speculative_tokens\": 4}' (docs/spec_decode.md)", parse=str)
    runner: str = _opt(
        "what requests the model serves: generate (text), pooling (embeddings, scores, "
        "classes: docs/pooling.md) or auto (pooling for BERT, *ForSequenceClassification and "
        "sentence-transformers checkpoints)", "auto", choices=RUNNERS)
    pooler_config: str | None = _opt(
        "runner pooling: how the model pools, as JSON over what the checkpoint says, e.g. "
        "'{\"pooling_type\": \"MEAN\", \"normalize\": true, "
        "\"matryoshka_dimensions\": [256, 512]}'")
    engine_core_process: bool = _opt(
        "run the engine core (scheduler, step loop, workers) in a process of its own, apart "
        "from HTTP handling, tokenizing and detokenizing (default: on for `serve`, off for "
        "LLM and `generate`)", False)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            meta = f.metadata
            flags = ["--" + meta.get("cli_name", f.name.replace("_", "-")),
                     *meta.get("aliases", ())]
            if f.type in ("bool", bool):
                parser.add_argument(*flags, dest=f.name, default=f.default, help=meta["help"],
                                    action=argparse.BooleanOptionalAction)
                continue
            kind = meta.get("parse") or _cli_type(f.type)
            parser.add_argument(*flags, dest=f.name, default=f.default, type=kind,
                                choices=meta.get("choices"), help=meta["help"])

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        self._check_device_options()
        self._check_quantization()
        if self.kv_cache_memory_bytes is not None:
            self.kv_cache_memory_bytes = parse_bytes(self.kv_cache_memory_bytes)
        positive = ("block_size", "max_num_seqs", "max_num_batched_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")
        self._check_scheduling()
        self._check_lora()
        self._check_parallelism()
        self._check_speculative()
        self._check_pooling()

    def _check_speculative(self) -> None:
        from pagedllm.spec_decode.config import SpeculativeConfig

        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        spec = self.speculative_config
        if spec is not None and self.world_size > 1:
            raise ValueError("speculative_config with more than one rank (tensor or pipeline "
                             "parallelism) is not supported yet")
        if spec is not None and spec.model is not None and self.preemption_mode == "swap":
            raise ValueError("a draft model (speculative_config) with preemption_mode='swap' "
                             "is not supported yet; use recompute")
        if spec is not None and spec.model is not None and self.enable_lora:
            raise ValueError("a draft model (speculative_config) with enable_lora is not "
                             "supported yet")

    def _check_pooling(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        parse_pooler_config(self.pooler_config)  # a bad JSON object fails here, by name
        if self.runner == "pooling" and self.speculative_config is not None:
            raise ValueError("speculative_config is for generation; runner='pooling' makes no "
                             "tokens to speculate on")

    @property
    def pooler_overrides(self) -> dict:
        return parse_pooler_config(self.pooler_config)

    def _check_device_options(self) -> None:
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, "
                             f"got {self.load_format!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")

    def _check_quantization(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"quantization must be one of {QUANTIZATION_CHOICES}, "
                             f"got {self.quantization!r}")
        if self.calculate_kv_scales and self.kv_cache_dtype == "auto":
            raise ValueError("calculate_kv_scales needs an fp8 KV cache (kv_cache_dtype='fp8')")

    def _check_scheduling(self) -> None:
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, "
                             f"got {self.preemption_mode!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, "
                             f"got {self.scheduling_policy!r}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be 0 (off) or positive, got "
                             f"{self.long_prefill_token_threshold}")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must not be negative, got {self.swap_space}")


    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def output_rank(self) -> int:
        """The rank that samples, whose step result the executor returns: the first
        tensor-parallel rank of the last pipeline stage (ranks are stage * tp + tp_rank)."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size

    def _check_parallelism(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        backend = self.distributed_executor_backend
        if backend is None:
            backend = self.distributed_executor_backend = "uni" if self.world_size == 1 else "mp"
        if backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}, "
                             f"got {backend!r}")
        if backend == "uni" and self.world_size > 1:
            raise ValueError(f"distributed_executor_backend='uni' runs one worker; "
                             f"{self.world_size} ranks need 'mp' or 'ray'")
        if backend == "ray" and importlib.util.find_spec("ray") is None:
            raise ValueError(RAY_MISSING)
        if self.world_size > 1 and self.enable_lora:
            raise ValueError("enable_lora with more than one rank (tensor or pipeline "
                             "parallelism) is not supported yet")
        if not 0 <= self.distributed_master_port < 65536:
            raise ValueError(f"distributed_master_port must be in [0, 65535], got "
                             f"{self.distributed_master_port}")
        if self.distributed_timeout <= 0:
            raise ValueError(f"distributed_timeout must be positive, got "
                             f"{self.distributed_timeout}")

    def _check_lora(self) -> None:
        if not self.enable_lora:
            changed = [name for name, default in LORA_DEFAULTS.items()
                       if getattr(self, name) != default]
            if changed:
                raise ValueError(f"{', '.join(changed)} set, but LoRA is off: pass "
                                 f"enable_lora=True (--enable-lora)")
            return
        for name in ("max_loras", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_lora_rank > MAX_LORA_RANK:
            raise ValueError(f"max_lora_rank must be at most {MAX_LORA_RANK}, got "
                             f"{self.max_lora_rank}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras "
                             f"({self.max_loras}): every adapter in a slot is also loaded")


def _cli_type(annotation: str) -> type:
    for name, kind in (("int", int), ("float", float)):
        if annotation.startswith(name):
            return kind
    return str


@dataclass(slots=True)
class CacheConfig:
    block_size: int
    num_blocks: int
    bytes_per_block: int


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    long_prefill_token_threshold: int = 0  # 0: a prompt chunk is limited by the budget only
    preemption_mode: str = "recompute"
    scheduling_policy: str = "fcfs"
    max_loras: int = 0  # distinct LoRA adapters one step may run; 0: LoRA is off
    # slots held past a sampling chunk's last token: a draft model writes its proposals' K/V
    # there (speculative decoding); 0 otherwise
    num_lookahead_tokens: int = 0
