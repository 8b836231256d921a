"""How much GPU memory the KV cache gets: what is left of the engine's share once the weights,
the largest step's activations and the CUDA graphs are paid for.

    total x gpu_memory_utilization                      the engine's share
      - in use after loading (weights, CUDA context,    measured: total - free, once the
        other processes on the GPU)                     profile run's cache is released
      - peak activations of the largest step            measured: a forward of
                                                        max_num_batched_tokens tokens, plus the
                                                        sampler's working set on its logits
      - CUDA graphs                                     estimated from a forward at the largest
                                                        captured decode batch, with block tables
                                                        max_model_len wide as the graphs have
      = KV cache

The arithmetic (GpuMemoryPlan) is pure and unit-tested on the CPU; the measuring functions run
the model on dummy batches, which are valid on any device (also tested on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.attention import AttentionMetadata, PrefillChunk
from pagedllm.distributed.parallel_state import pp_group
from pagedllm.utils import GiB, cdiv
from pagedllm.worker.kv_cache import KVCacheShape, allocate_kv_caches

# Beyond their pool, each captured graph holds its executable graph on the device (a few
# hundred kernel nodes); measured graphs of a 1 B model take well under this.
GRAPH_OVERHEAD_BYTES = 4 << 20


@dataclass(slots=True)
class GpuMemoryPlan:
    total: int
    utilization: float
    in_use: int  # after loading, with the allocator's cache emptied
    weights: int  # of in_use, the model's parameters and buffers
    activations: int  # peak above the weights during the largest step
    cuda_graphs: int  # estimate, 0 when graphs are off

    @property
    def share(self) -> int:
        return int(self.total * self.utilization)

    @property
    def kv_cache(self) -> int:
        return max(0, self.share - self.in_use - self.activations - self.cuda_graphs)

    def describe(self) -> str:
        other = max(0, self.in_use - self.weights)
        return (f"GPU memory: {self.total / GiB:.2f} GiB x {self.utilization:g} = "
                f"{self.share / GiB:.2f} GiB for the engine: weights {self.weights / GiB:.2f}, "
                f"other in use {other / GiB:.2f} (CUDA context, other processes), peak "
                f"activations {self.activations / GiB:.2f}, CUDA graphs "
                f"{self.cuda_graphs / GiB:.2f} (estimate) -> KV cache {self.kv_cache / GiB:.2f} GiB")


def graph_memory_estimate(decode_peak_bytes: int, num_graphs: int) -> int:
    """The graphs' shared pool holds about one forward's intermediates at the largest size
    (they are captured largest first and reuse them), plus each graph's own executable."""
    if num_graphs == 0:
        return 0
    return decode_peak_bytes + num_graphs * GRAPH_OVERHEAD_BYTES


@dataclass(slots=True)
class DummyBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    num_blocks: int  # KV blocks the batch's slots and block tables reach


def prefill_profile_batch(num_tokens: int, max_model_len: int, block_size: int,
                          device: torch.device | str) -> DummyBatch:
    """`num_tokens` prompt tokens as fresh prefill chunks of at most max_model_len tokens each,
    every chunk in blocks of its own, as the largest step the scheduler can send."""
    long = dict(dtype=torch.long, device=device)
    chunks, positions, slots, first_block = [], [], [], 0
    start = 0
    while start < num_tokens:
        length = min(max_model_len, num_tokens - start)
        blocks = torch.arange(first_block, first_block + cdiv(length, block_size), **long)
        chunks.append(PrefillChunk(start, length, length, blocks))
        positions += range(length)
        slots += range(first_block * block_size, first_block * block_size + length)
        first_block += len(blocks)
        start += length
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, **long),
        num_decodes=0,
        decode_block_tables=torch.zeros(0, 0, **long),
        decode_seq_lens=torch.zeros(0, **long),
        prefills=chunks,
        block_size=block_size,
    )
    return DummyBatch(torch.zeros(num_tokens, **long), torch.tensor(positions, **long),
                      metadata, first_block)


def decode_profile_batch(batch_size: int, block_size: int, max_blocks: int,
                         device: torch.device | str) -> DummyBatch:
    """`batch_size` decodes of 1-token sequences, each writing a slot of its own (the rows of a
    block all read its first slot: what they read does not change the memory a step takes).
    The block tables are `max_blocks` wide, as a captured graph's are: a split-over-context
    decode kernel sizes its partial results by that width."""
    long = dict(dtype=torch.long, device=device)
    slots = torch.arange(batch_size, **long)
    tables = torch.zeros(batch_size, max_blocks, **long)
    tables[:, 0] = slots // block_size
    metadata = AttentionMetadata(
        slot_mapping=slots,
        num_decodes=batch_size,
        decode_block_tables=tables,
        decode_seq_lens=torch.ones(batch_size, **long),
        prefills=[],
        block_size=block_size,
    )
    return DummyBatch(torch.zeros(batch_size, **long), torch.zeros(batch_size, **long), metadata,
                      cdiv(batch_size, block_size))


@torch.inference_mode()
def run_dummy_step(model: torch.nn.Module, batch: DummyBatch, kv_caches,
                   num_logit_rows: int) -> torch.Tensor:
    """The model on `batch` (kv_caches must hold batch.num_blocks blocks), then the sampler's
    heaviest work on the last `num_logit_rows` rows: float32 logits, their sort (top-k/top-p)
    and softmax. Returns the hidden states. Under parallelism every rank runs it at once (its
    collectives meet); a later pipeline stage starts from zeros in place of the previous
    stage's activations, and only the last one has logits (only its first tensor-parallel
    rank gets them)."""
    pp = pp_group()
    intermediate = None if pp.is_first else tuple(
        buffer.zero_() for buffer in model.intermediate_buffers(
            batch.input_ids.shape[0], model.activation_dtype, batch.input_ids.device))
    hidden = model(batch.input_ids, batch.positions, kv_caches, batch.metadata, intermediate)
    if not pp.is_last:
        return hidden[0]
    logits = model.compute_logits(hidden[-num_logit_rows:]) if num_logit_rows else None
    if logits is not None:
        logits = logits.float()
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1)
        del sorted_logits, order, probs, logprobs
    return hidden


def peak_memory_of_step(model: torch.nn.Module, batch: DummyBatch, kv_shape: KVCacheShape,
                        num_logit_rows: int, device: torch.device) -> int:
    """Bytes a step allocates at its peak above what was allocated before it, not counting
    the KV cache it runs on (CUDA only)."""
    kv_caches = allocate_kv_caches(kv_shape, batch.num_blocks, str(device))
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_dummy_step(model, batch, kv_caches, num_logit_rows)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del kv_caches
    return max(0, peak)


def plan_gpu_memory(model: torch.nn.Module, kv_shape: KVCacheShape, weights_bytes: int,
                    utilization: float, max_num_batched_tokens: int, max_num_seqs: int,
                    max_model_len: int, graph_sizes: list[int],
                    device: torch.device) -> GpuMemoryPlan:
    """Profile the largest prefill step (and the largest graph's decode step), then measure
    what is in use once the allocator's cache is released."""
    bs = kv_shape.block_size
    prefill = prefill_profile_batch(max_num_batched_tokens, max_model_len, bs, device)
    activations = peak_memory_of_step(model, prefill, kv_shape,
                                      min(max_num_seqs, max_num_batched_tokens), device)
    graphs = 0
    if graph_sizes:
        decode = decode_profile_batch(graph_sizes[-1], bs, cdiv(max_model_len, bs), device)
        decode_peak = peak_memory_of_step(model, decode, kv_shape, 0, device)
        graphs = graph_memory_estimate(decode_peak, len(graph_sizes))
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return GpuMemoryPlan(total, utilization, total - free, weights_bytes, activations, graphs)
