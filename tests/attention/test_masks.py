"""Sliding windows and soft caps in the PyTorch and C++ backends, against a naive reference.

One mixed batch covers every path: decodes, a prefill chunk with no cached prefix (the SDPA
fast path when neither option is set) and chunks after a cached prefix (a prefix hit or a later
chunk). The reference attends each query token on its own, in float64, over a contiguous copy
of its sequence, so it shares no masking code with the backends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from pagedllm.attention.backend import AttentionMetadata, PrefillChunk
from pagedllm.attention.cpu_backend import CpuAttentionBackend
from pagedllm.attention.torch_backend import TorchAttentionBackend
from pagedllm.ops.cpu import cpu_ops

BLOCK_SIZE = 8
HEADS, KV_HEADS, HEAD_DIM = 6, 2, 32


@dataclass
class Sequence:
    cached: int  # tokens already in the cache before this step
    new: int  # tokens this step adds (1 for a decode)


# decodes first, then prefill chunks: no prefix, after a prefix, a long one after a prefix
SEQUENCES = [Sequence(0, 1), Sequence(4, 1), Sequence(30, 1), Sequence(0, 13), Sequence(9, 6),
             Sequence(17, 20)]


def build_batch(dtype: torch.dtype, seed: int = 0):
    """Random pools with each sequence's cached tokens already written; the step's new tokens
    come back as query/key/value rows with the metadata that places them."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    num_blocks = 48
    pools = (rand(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM).to(dtype),
             rand(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM).to(dtype))
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, contexts, slots = [], [], []
    for seq in SEQUENCES:
        total = seq.cached + seq.new
        table = [free.pop() for _ in range(-(-total // BLOCK_SIZE))]
        tables.append(table)
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                  for p in range(seq.cached, total)]
        contexts.append(total)
    tokens = len(slots)
    query = rand(tokens, HEADS, HEAD_DIM).to(dtype)
    key, value = rand(tokens, KV_HEADS, HEAD_DIM).to(dtype), rand(tokens, KV_HEADS, HEAD_DIM).to(dtype)
    decodes = [i for i, s in enumerate(SEQUENCES) if s.new == 1]
    width = max(len(tables[i]) for i in decodes)
    chunks, start = [], len(decodes)
    for i, seq in enumerate(SEQUENCES[len(decodes):], len(decodes)):
        chunks.append(PrefillChunk(start, seq.new, contexts[i], torch.tensor(tables[i])))
        start += seq.new
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots), num_decodes=len(decodes),
        decode_block_tables=torch.tensor([tables[i] + [0] * (width - len(tables[i]))
                                          for i in decodes]),
        decode_seq_lens=torch.tensor([contexts[i] for i in decodes]), prefills=chunks,
        block_size=BLOCK_SIZE)
    return query, key, value, pools, metadata, tables


def sequence_rows(pool: torch.Tensor, table: list[int], total: int) -> torch.Tensor:
    """A sequence's first `total` cached rows, contiguous, in float64."""
    return torch.stack([pool[table[p // BLOCK_SIZE], p % BLOCK_SIZE] for p in range(total)]).double()


def reference(query, key, value, pools, tables, scale, window, soft_cap) -> torch.Tensor:
    """Each query row on its own, float64, over its sequence's keys (cached, then new)."""
    key_pool, value_pool = pools
    out, row = torch.empty(query.shape, dtype=torch.float64), 0
    for seq, table in zip(SEQUENCES, tables):
        total = seq.cached + seq.new
        keys, values = (sequence_rows(pool, table, total) for pool in (key_pool, value_pool))
        keys[seq.cached:], values[seq.cached:] = key[row:row + seq.new], value[row:row + seq.new]
        for i in range(seq.new):
            pos = seq.cached + i
            lo = max(0, pos - window + 1) if window else 0
            for h in range(HEADS):
                kv = h // (HEADS // KV_HEADS)
                scores = keys[lo:pos + 1, kv] @ query[row + i, h].double() * scale
                if soft_cap:
                    scores = soft_cap * torch.tanh(scores / soft_cap)
                out[row + i, h] = torch.softmax(scores, 0) @ values[lo:pos + 1, kv]
        row += seq.new
    return out


def backends():
    yield TorchAttentionBackend()
    ops = cpu_ops()
    if ops is not None:
        yield CpuAttentionBackend(ops)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("window,soft_cap", [(None, None), (5, None), (None, 2.5), (12, 2.5),
                                             (1, None)])
def test_backends_match_naive_reference(dtype, tolerance, window, soft_cap):
    scale = 1 / math.sqrt(HEAD_DIM)
    for backend in backends():
        query, key, value, pools, metadata, tables = build_batch(dtype)
        expected = reference(query, key, value, pools, tables, scale, window, soft_cap)
        actual = backend.forward(query, key, value, pools, metadata, scale,
                                 sliding_window=window, soft_cap=soft_cap)
        torch.testing.assert_close(actual.double(), expected, atol=tolerance, rtol=tolerance,
                                   msg=lambda m, b=backend: f"{type(b).__name__}: {m}")


def test_window_and_cap_change_the_result():
    """Guards the reference itself: the options it tests must actually matter on this batch."""
    query, key, value, pools, metadata, tables = build_batch(torch.float32)
    plain = reference(query, key, value, pools, tables, 0.2, None, None)
    assert not torch.allclose(plain, reference(query, key, value, pools, tables, 0.2, 5, None))
    assert not torch.allclose(plain, reference(query, key, value, pools, tables, 0.2, None, 2.5))
