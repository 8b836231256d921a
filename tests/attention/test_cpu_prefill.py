"""The C++ prefill-attention kernel against a float64 reference, on every kernel build this CPU
runs (the `ops` fixture in tests/conftest.py).

Each call carries several chunks, as a step does: with no cached prefix and after one (the
chunk's queries are the last query_len positions of its context), of lengths around the kernel's
tiles (1, 15, 16, 17, more than 100), behind a few decode rows the kernel must leave alone. The
caches are random and every chunk's blocks are scattered through the pool.
"""

from __future__ import annotations

import math

import pytest
import torch

from pagedllm.attention.backend import AttentionMetadata, PrefillChunk
from pagedllm.attention.cpu_backend import CpuAttentionBackend
from pagedllm.attention.torch_backend import TorchAttentionBackend, gather_context, visible

BLOCK_SIZE = 16
DECODE_ROWS = 3  # rows before the first chunk, which the kernel must not write
SENTINEL = 7.0
# (query_len, context_len): no prefix, then after a cached prefix
CHUNKS = [(1, 1), (15, 15), (16, 16), (17, 17), (130, 130), (15, 40), (17, 100), (1, 33),
          (100, 260)]


def random_chunks(spec, num_heads, num_kv_heads, head_dim, dtype, seed=0):
    """query [tokens, heads, dim], caches, and PrefillChunks over shuffled blocks."""
    generator = torch.Generator().manual_seed(seed)
    needed = [-(-context // BLOCK_SIZE) for _, context in spec]
    num_blocks = sum(needed) + 5  # a few blocks no chunk uses
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=generator).to(dtype)
    value_cache = torch.randn(shape, generator=generator).to(dtype)
    free = torch.randperm(num_blocks, generator=generator)
    chunks, start, used = [], DECODE_ROWS, 0
    for (query_len, context_len), blocks in zip(spec, needed):
        chunks.append(PrefillChunk(start, query_len, context_len, free[used : used + blocks]))
        start, used = start + query_len, used + blocks
    # larger than unit scores make the softmax peaked and the soft cap bend
    query = (2 * torch.randn(start, num_heads, head_dim, generator=generator)).to(dtype)
    return query, (key_cache, value_cache), chunks


def chunk_tensors(chunks):
    """The kernel's inputs: [num_chunks, 3] chunk rows and [num_chunks, max_blocks] tables."""
    rows = torch.tensor([[c.query_start, c.query_len, c.context_len] for c in chunks])
    tables = torch.zeros(len(chunks), max(len(c.block_table) for c in chunks), dtype=torch.long)
    for i, chunk in enumerate(chunks):
        tables[i, : len(chunk.block_table)] = chunk.block_table
    return rows, tables


def run_kernel(ops, query, kv_cache, chunks, scale, window=None, soft_cap=None):
    out = torch.full_like(query, SENTINEL)
    rows, tables = chunk_tensors(chunks)
    ops.paged_prefill_attention(out, query, kv_cache[0], kv_cache[1], rows, tables, scale,
                                window or 0, soft_cap or 0.0)
    return out


def reference(query, kv_cache, chunk, scale, window=None, soft_cap=None) -> torch.Tensor:
    """[query_len, heads, dim] float64: scores, cap, mask, softmax, weighted sum."""
    keys, values = (gather_context(cache, chunk.block_table)[:, : chunk.context_len].double()
                    for cache in kv_cache)  # [kv_heads, context, dim]
    q = query[chunk.query_start : chunk.query_start + chunk.query_len].double().transpose(0, 1)
    group = q.shape[0] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    scores = q @ keys.transpose(1, 2) * scale  # [heads, query_len, context]
    if soft_cap:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    prefix = chunk.context_len - chunk.query_len
    q_pos = torch.arange(chunk.query_len)[:, None] + prefix
    mask = visible(q_pos, torch.arange(chunk.context_len)[None, :], window)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs @ values).transpose(0, 1)


def assert_matches_reference(out, query, kv_cache, chunks, scale, window, soft_cap, tolerance):
    assert out.dtype == query.dtype and out.shape == query.shape
    assert torch.all(out[:DECODE_ROWS] == SENTINEL), "rows outside the chunks were written"
    for i, chunk in enumerate(chunks):
        expected = reference(query, kv_cache, chunk, scale, window, soft_cap)
        actual = out[chunk.query_start : chunk.query_start + chunk.query_len].double()
        torch.testing.assert_close(
            actual, expected, atol=tolerance, rtol=tolerance,
            msg=lambda m, i=i, c=chunk: f"chunk {i} ({c.query_len} of {c.context_len}): {m}")


MASKS = [(None, None), (1, None), (5, None), (12, None), (None, 3.0), (5, 3.0)]
DTYPES = [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)]


@pytest.mark.parametrize("dtype,tolerance", DTYPES)
@pytest.mark.parametrize("window,soft_cap", MASKS)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [
    (4, 4, 32),  # no grouping
    (6, 3, 80),  # head_dim a multiple of 16 but not of a 64-float micro-kernel block
    (9, 3, 64),  # SmolLM2's shape
    (8, 2, 128),
    (8, 2, 24),  # head_dim not a whole AVX-512 vector: padded buffers
])
def test_prefill_kernel_matches_reference(ops, dtype, tolerance, window, soft_cap, num_heads,
                                          num_kv_heads, head_dim):
    query, kv_cache, chunks = random_chunks(CHUNKS, num_heads, num_kv_heads, head_dim, dtype)
    scale = 1 / math.sqrt(head_dim)
    out = run_kernel(ops, query, kv_cache, chunks, scale, window, soft_cap)
    assert_matches_reference(out, query, kv_cache, chunks, scale, window, soft_cap, tolerance)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(16, 1, 256), (5, 5, 8)])
def test_prefill_kernel_wide_groups_and_small_heads(ops, num_heads, num_kv_heads, head_dim):
    """Multi-query attention with wide heads (few positions per tile), and heads narrower than
    a vector."""
    spec = [(40, 40), (7, 90)]
    query, kv_cache, chunks = random_chunks(spec, num_heads, num_kv_heads, head_dim,
                                            torch.float32)
    out = run_kernel(ops, query, kv_cache, chunks, head_dim**-0.5, 9)
    assert_matches_reference(out, query, kv_cache, chunks, head_dim**-0.5, 9, None, 1e-4)


def test_prefill_kernel_rejects_bad_inputs(ops):
    query, (key_cache, value_cache), chunks = random_chunks([(5, 20)], 4, 2, 32, torch.float32)
    rows, tables = chunk_tensors(chunks)
    out = torch.empty_like(query)
    call = ops.paged_prefill_attention
    with pytest.raises(RuntimeError, match="must be the query's dtype or fp8"):
        call(out, query, key_cache.bfloat16(), value_cache.bfloat16(), rows, tables, 1.0, 0, 0.0)
    with pytest.raises(RuntimeError, match="K and V cache dtypes differ"):
        call(out, query, key_cache, value_cache.bfloat16(), rows, tables, 1.0, 0, 0.0)
    with pytest.raises(RuntimeError, match="int64"):
        call(out, query, key_cache, value_cache, rows.int(), tables, 1.0, 0, 0.0)
    with pytest.raises(RuntimeError, match="needs 2 blocks"):
        call(out, query, key_cache, value_cache, rows, tables[:, :1].contiguous(), 1.0, 0, 0.0)
    with pytest.raises(RuntimeError, match="block id"):
        call(out, query, key_cache, value_cache, rows, tables + 100, 1.0, 0, 0.0)
    with pytest.raises(RuntimeError, match="outside the"):
        call(out[:4], query[:4], key_cache, value_cache, rows, tables, 1.0, 0, 0.0)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        call(out[:, :3].contiguous(), query[:, :3].contiguous(), key_cache, value_cache, rows,
             tables, 1.0, 0, 0.0)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_backend_runs_every_chunk_in_one_call(ops, dtype, tolerance):
    """CpuAttentionBackend.forward on a batch of decodes and chunks matches the PyTorch backend
    with one kernel call per layer, building its chunk tensors once per metadata (the step)."""
    query, kv_cache, chunks = random_chunks(CHUNKS[:6], 9, 3, 64, dtype)
    decode_tables = torch.stack([chunks[-1].block_table[:3]] * DECODE_ROWS)
    decode_lens = torch.tensor([3, 20, 40])
    slots = [int(table[(n - 1) // BLOCK_SIZE]) * BLOCK_SIZE + (n - 1) % BLOCK_SIZE
             for table, n in zip(decode_tables, decode_lens)]
    for chunk in chunks:
        slots += [int(chunk.block_table[p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE
                  for p in range(chunk.context_len - chunk.query_len, chunk.context_len)]
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots), num_decodes=DECODE_ROWS,
        decode_block_tables=decode_tables, decode_seq_lens=decode_lens, prefills=chunks,
        block_size=BLOCK_SIZE)
    # the new rows are what the cache already holds at their slots: writing them changes nothing
    key, value = (cache.view(-1, 3, 64)[metadata.slot_mapping] for cache in kv_cache)
    counting = CountingOps(ops)
    backend = CpuAttentionBackend(counting)
    backend.sdpa_for_bf16_prefill = False  # the kernel, even where AMX would take bf16 (below)
    expected = TorchAttentionBackend().forward(query, key, value, kv_cache, metadata, 0.125)
    step_tensors = []
    for layer in range(2):
        actual = backend.forward(query, key, value, kv_cache, metadata, 0.125)
        torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance,
                                   rtol=tolerance)
        assert counting.prefill_calls == layer + 1  # all six chunks in one call
        step_tensors.append(backend._chunk_tensors(metadata))
    # the second layer reuses the step's chunk tensors
    assert all(a is b for a, b in zip(*step_tensors))


class CountingOps:
    """The kernel module, counting prefill calls."""

    def __init__(self, ops) -> None:
        self._ops = ops
        self.prefill_calls = 0

    def __getattr__(self, name: str):
        return getattr(self._ops, name)

    def paged_prefill_attention(self, *args) -> None:
        self.prefill_calls += 1
        self._ops.paged_prefill_attention(*args)


def test_with_amx_bf16_prefill_goes_to_sdpa_and_float32_to_the_kernel(ops):
    counting = CountingOps(ops)
    backend = CpuAttentionBackend(counting)
    backend.sdpa_for_bf16_prefill = True
    for dtype, kernel_calls in ((torch.bfloat16, 0), (torch.float32, 1)):
        query, kv_cache, chunks = random_chunks(CHUNKS[:2], 4, 2, 32, dtype)
        query = query[DECODE_ROWS:]  # a prefill-only step: the chunks start at row 0
        chunks = [PrefillChunk(c.query_start - DECODE_ROWS, c.query_len, c.context_len,
                               c.block_table) for c in chunks]
        slots = torch.cat([chunk_slots(chunk) for chunk in chunks])
        metadata = AttentionMetadata(
            slot_mapping=slots, num_decodes=0, decode_block_tables=torch.empty(0, 1).long(),
            decode_seq_lens=torch.empty(0).long(), prefills=chunks, block_size=BLOCK_SIZE)
        key, value = (cache.view(-1, 2, 32)[slots] for cache in kv_cache)
        expected = TorchAttentionBackend().forward(query, key, value, kv_cache, metadata, 0.2)
        actual = backend.forward(query, key, value, kv_cache, metadata, 0.2)
        torch.testing.assert_close(actual, expected, atol=3e-2, rtol=3e-2)
        assert counting.prefill_calls == kernel_calls
        counting.prefill_calls = 0


def chunk_slots(chunk) -> torch.Tensor:
    positions = torch.arange(chunk.context_len - chunk.query_len, chunk.context_len)
    return chunk.block_table[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
