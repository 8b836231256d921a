"""The paged KV pools, sized from a memory budget.

All layers share one allocation, [layers, 2 (K, V), num_blocks, block_size, kv_heads, head_dim];
each layer gets a (key_cache, value_cache) pair of views into it. Its element type is the
model's dtype, or one byte with kv_cache_dtype="fp8" (attention/kv_quant.py): half a bf16
block's bytes, so twice the tokens fit in the same budget.

Slots that hold no token yet are masked by attention, but a masked slot still meets a zero
weight in probs @ V, so it must never hold NaN/Inf. The pools therefore start as zeros. On the
CPU a pool this large comes straight from mmap, whose pages the kernel hands out zero-filled on
first touch, so `torch.empty` already gives zeros without paying seconds to write gigabytes at
start-up; on CUDA we clear explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from pagedllm.config import CPU_DEFAULT_KV_CACHE_BYTES
from pagedllm.distributed.parallel_state import kv_heads_per_rank
from pagedllm.utils import head_dim_of

# glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh mmap pages.
LAZY_ZERO_MIN_BYTES = 64 << 20


@dataclass(slots=True)
class KVCacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def from_config(cls, config: PretrainedConfig, block_size: int, dtype: torch.dtype,
                    tp_size: int = 1, num_layers: int | None = None) -> KVCacheShape:
        """One rank's pools: under tensor parallelism a rank caches only its own KV heads,
        under pipeline parallelism only its stage's `num_layers` layers."""
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(num_layers or config.num_hidden_layers, kv_heads_per_rank(kv_heads, tp_size),
                   head_dim_of(config), block_size, dtype)

    @property
    def bytes_per_block(self) -> int:
        element = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element


def kv_cache_budget(memory_bytes: int | None) -> int:
    """The budget the user gave, or the CPU's default. On CUDA without one, the budget is what
    the memory plan leaves (worker/memory_plan.py)."""
    return CPU_DEFAULT_KV_CACHE_BYTES if memory_bytes is None else memory_bytes


def allocate_kv_caches(shape: KVCacheShape, num_blocks: int,
                       device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    size = (shape.num_layers, 2, num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
    if device == "cpu" and num_blocks * shape.bytes_per_block >= LAZY_ZERO_MIN_BYTES:
        pools = torch.empty(size, dtype=shape.dtype, device=device)
    else:
        pools = torch.zeros(size, dtype=shape.dtype, device=device)
    return [(layer[0], layer[1]) for layer in pools]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights),
    plus the run-time layouts that quantized layers keep outside them (a PackedLinear's
    `int_weight`, model/layers/quantization/packed_linear.py)."""
    storages: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    packed = (getattr(module, "int_weight", None) for module in model.modules())
    return sum(storages.values()) + sum(layout.nbytes for layout in packed if layout is not None)


def describe_plan(shape: KVCacheShape, num_blocks: int, max_model_len: int,
                  weights: int | None = None) -> str:
    tokens = num_blocks * shape.block_size
    gib = num_blocks * shape.bytes_per_block / 2**30
    fits = tokens / max_model_len
    weights_text = "" if weights is None else f"weights {weights / 2**20:.1f} MiB; "
    return (f"{weights_text}KV cache: {num_blocks} blocks x {shape.block_size} tokens = "
            f"{tokens} tokens ({gib:.2f} GiB, {str(shape.dtype).removeprefix('torch.')}); "
            f"{fits:.1f} sequences of max_model_len {max_model_len} fit at once")
