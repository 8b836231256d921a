"""The Triton kernels against a plain float64 reference, on paged caches with shuffled blocks.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton (Triton reads it when @triton.jit wraps a
function, its own tl.sum and tl.zeros included). With a GPU the same tests run compiled, on CUDA
tensors. Shapes are small: the interpreter runs each program in Python.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.attention import triton_ops  # noqa: E402
from pagedllm.attention.backend import AttentionMetadata, PrefillChunk  # noqa: E402
from pagedllm.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from pagedllm.attention.triton_backend import TritonAttentionBackend  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("no GPU, and TRITON_INTERPRET is not 1", allow_module_level=True)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


# --- the reference ---------------------------------------------------------------------------


def gather(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """A sequence's first `length` positions out of a paged pool: [length, kv_heads, dim]."""
    return cache[table.long()].flatten(0, 1)[:length]


def reference(query: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor, scale: float, window: int | None = None,
              soft_cap: float | None = None) -> torch.Tensor:
    """query [q, heads, dim] at absolute `positions` over keys/values [context, kv_heads, dim]."""
    group = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.double(), k) * scale
    if soft_cap:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    key_pos = torch.arange(keys.shape[0], device=query.device)
    visible = key_pos[None, :] <= positions[:, None]
    if window:
        visible &= key_pos[None, :] > positions[:, None] - window
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that sees nothing -> zeros
    return torch.einsum("hqk,khd->qhd", probs, v)


def random_pool(num_blocks: int, block_size: int, kv_heads: int, dim: int, dtype: torch.dtype,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, block_size, kv_heads, dim)
    return (torch.randn(shape, generator=generator).to(dtype).to(DEVICE),
            torch.randn(shape, generator=generator).to(dtype).to(DEVICE))


def random_tables(lengths: list[int], block_size: int, num_blocks: int,
                  generator: torch.Generator) -> list[torch.Tensor]:
    """Disjoint block tables drawn from a shuffled pool, so a sequence's blocks are scattered."""
    counts = [-(-n // block_size) for n in lengths]
    blocks = torch.randperm(num_blocks, generator=generator)[: sum(counts)]
    return [t.to(DEVICE) for t in torch.split(blocks, counts)]


def padded(tables: list[torch.Tensor], width: int) -> torch.Tensor:
    rows = [torch.cat([t.cpu(), torch.zeros(width - len(t), dtype=torch.long)]) for t in tables]
    return torch.stack(rows).to(DEVICE)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(),
                               atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


# --- write_kv ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,dim,block_size", [(2, 32, 8), (3, 80, 16)])
def test_write_kv_stores_at_slots_and_skips_padding(dtype, kv_heads, dim, block_size):
    g = torch.Generator().manual_seed(0)
    key_cache, value_cache = random_pool(6, block_size, kv_heads, dim, dtype, g)
    # key and value as views of one fused projection: the token stride is not kv_heads * dim
    fused = torch.randn(5, 2 * kv_heads * dim + 3, generator=g).to(dtype).to(DEVICE)
    key = fused[:, : kv_heads * dim].view(5, kv_heads, dim)
    value = fused[:, kv_heads * dim : 2 * kv_heads * dim].view(5, kv_heads, dim)
    slots = torch.tensor([3, block_size * 4 + 1, -1, block_size * 6 - 1, 0], device=DEVICE)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    real = slots >= 0
    expected_k.view(-1, kv_heads, dim)[slots[real]] = key[real]
    expected_v.view(-1, kv_heads, dim)[slots[real]] = value[real]

    triton_ops.write_kv(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)


# --- decode ------------------------------------------------------------------------------------


def run_decode(seq_lens: list[int], heads: int, kv_heads: int, dim: int, block_size: int,
               dtype: torch.dtype, window: int | None = None, soft_cap: float | None = None,
               **launch) -> None:
    g = torch.Generator().manual_seed(sum(seq_lens) + heads + dim + block_size)
    key_cache, value_cache = random_pool(48, block_size, kv_heads, dim, dtype, g)
    tables = random_tables(seq_lens, block_size, 48, g)
    width = max(len(t) for t in tables) + 1  # one padding column more than any row needs
    query = torch.randn(len(seq_lens), heads, dim, generator=g).to(dtype).to(DEVICE)
    out = torch.full_like(query, float("nan"))
    scale = dim**-0.5
    triton_ops.decode_attention(out, query, key_cache, value_cache, padded(tables, width),
                                torch.tensor(seq_lens, device=DEVICE), scale, window, soft_cap,
                                **launch)
    for row, (n, table) in enumerate(zip(seq_lens, tables)):
        if n == 0:  # a padded row of a CUDA-graph batch: finite zeros
            assert torch.equal(out[row].cpu(), torch.zeros_like(out[row].cpu()))
            continue
        expected = reference(query[row : row + 1], torch.tensor([n - 1], device=DEVICE),
                             gather(key_cache, table, n), gather(value_cache, table, n), scale,
                             window, soft_cap)
        assert_close(out[row : row + 1], expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (8, 2), (6, 2)])  # group 1, 2, 4, 3
def test_decode_split_over_partitions(dtype, heads, kv_heads):
    # partitions of 32 tokens in tiles of 16: 70 tokens span three partitions (the last one
    # partial), 0 is a padded row, 1 and 16 end on a tile or block edge
    run_decode([70, 0, 1, 16, 45], heads, kv_heads, 32, 8, dtype, partition_size=32, tile_n=16)


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_decode_one_partition_writes_output_directly(block_size):
    run_decode([37, 0, 100], 4, 1, 64, block_size, torch.float32, partition_size=512)


def test_decode_default_partitions_split_small_batches():
    # one sequence, one KV head: the default partitions shrink to 128 positions, so 300 tokens
    # take three programs and the reduce
    run_decode([300], 2, 1, 32, 16, torch.bfloat16)


@pytest.mark.parametrize("dim", [80, 128])
def test_decode_head_dims(dim):
    run_decode([50, 3], 4, 2, dim, 16, torch.bfloat16, partition_size=32, tile_n=16)


@pytest.mark.parametrize("window,soft_cap", [(20, None), (None, 5.0), (7, 2.0), (200, None)])
def test_decode_window_and_soft_cap(window, soft_cap):
    # window 20 leaves the first partitions of the 90-token row empty; 200 is wider than all
    run_decode([90, 0, 12, 33], 4, 2, 32, 8, torch.float32, window, soft_cap,
               partition_size=32, tile_n=16)


# --- prefill -----------------------------------------------------------------------------------


def run_prefill(chunks: list[tuple[int, int]], heads: int, kv_heads: int, dim: int,
                block_size: int, dtype: torch.dtype, window: int | None = None,
                soft_cap: float | None = None, block_m: int | None = 16,
                tile_n: int | None = 16) -> None:
    """chunks: (query_len, context_len) each; the cached prefix is context_len - query_len."""
    g = torch.Generator().manual_seed(sum(c for _, c in chunks) + heads + dim + block_size)
    key_cache, value_cache = random_pool(64, block_size, kv_heads, dim, dtype, g)
    tables = random_tables([c for _, c in chunks], block_size, 64, g)
    num_tokens = sum(q for q, _ in chunks) + 2  # two stray rows that belong to no chunk
    query = torch.randn(num_tokens, heads, dim, generator=g).to(dtype).to(DEVICE)
    starts = [1 + sum(q for q, _ in chunks[:i]) for i in range(len(chunks))]
    plan = triton_ops.plan_prefill(starts, [q for q, _ in chunks], [c for _, c in chunks], tables,
                                   heads // kv_heads, dim, dtype, block_m=block_m)
    out = torch.zeros_like(query)
    scale = dim**-0.5
    triton_ops.prefill_attention(out, query, key_cache, value_cache, plan, scale, window, soft_cap,
                                 tile_n=tile_n)
    for start, (length, context), table in zip(starts, chunks, tables):
        positions = torch.arange(context - length, context, device=DEVICE)
        expected = reference(query[start : start + length], positions,
                             gather(key_cache, table, context), gather(value_cache, table, context),
                             scale, window, soft_cap)
        assert_close(out[start : start + length], expected, dtype)
    assert not out[0].any() and not out[-1].any()  # rows outside every chunk are left alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (6, 2), (8, 2)])
def test_prefill_chunks_with_and_without_prefix(dtype, heads, kv_heads):
    # a fresh prompt, a chunk after a cached prefix, a one-token chunk, a chunk after a prefix
    # that ends mid-block, one whose first query sits just before a key-tile edge (position 14 of
    # 16: the tile must stay causally masked); tiles of 16 rows cut the longer chunks in several
    run_prefill([(21, 21), (9, 40), (1, 17), (12, 13), (3, 17)], heads, kv_heads, 32, 8, dtype)


@pytest.mark.parametrize("block_size,dim", [(16, 64), (32, 96)])
def test_prefill_block_sizes_and_default_tiles(block_size, dim):
    run_prefill([(30, 70), (45, 45)], 4, 1, dim, block_size, torch.bfloat16, block_m=None,
                tile_n=None)


@pytest.mark.parametrize("window,soft_cap", [(6, None), (None, 3.0), (10, 1.5)])
def test_prefill_window_and_soft_cap(window, soft_cap):
    run_prefill([(20, 20), (11, 50)], 4, 2, 32, 8, torch.float32, window, soft_cap)


# --- the backend -------------------------------------------------------------------------------


def mixed_batch(block_size: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype):
    """Three decodes (one a padded row) and two prefill chunks, one after a cached prefix."""
    g = torch.Generator().manual_seed(7)
    key_cache, value_cache = random_pool(40, block_size, kv_heads, dim, dtype, g)
    decode_lens, chunks = [19, 1, 33], [(13, 13), (6, 27)]
    tables = random_tables(decode_lens + [c for _, c in chunks], block_size, 40, g)
    num_tokens = len(decode_lens) + sum(q for q, _ in chunks)
    slots: list[int] = []
    for n, table in zip(decode_lens, tables):
        slots.append(int(table[(n - 1) // block_size]) * block_size + (n - 1) % block_size)
    prefills, start = [], len(decode_lens)
    for (length, context), table in zip(chunks, tables[len(decode_lens):]):
        prefills.append(PrefillChunk(start, length, context, table))
        for p in range(context - length, context):
            slots.append(int(table[p // block_size]) * block_size + p % block_size)
        start += length
    width = max(len(t) for t in tables[: len(decode_lens)])
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=DEVICE), num_decodes=len(decode_lens),
        decode_block_tables=padded(tables[: len(decode_lens)], width),
        decode_seq_lens=torch.tensor(decode_lens, device=DEVICE), prefills=prefills,
        block_size=block_size)
    qkv = [torch.randn(num_tokens, h, dim, generator=g).to(dtype).to(DEVICE)
           for h in (heads, kv_heads, kv_heads)]
    return qkv, (key_cache, value_cache), metadata


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backend_matches_torch_backend_on_mixed_batch(dtype):
    (query, key, value), cache, metadata = mixed_batch(8, 6, 2, 32, dtype)
    torch_cache = tuple(c.clone() for c in cache)
    actual = TritonAttentionBackend().forward(query, key, value, cache, metadata, 0.2)
    expected = TorchAttentionBackend().forward(query, key, value, torch_cache, metadata, 0.2)
    assert torch.equal(cache[0], torch_cache[0]) and torch.equal(cache[1], torch_cache[1])
    assert_close(actual, expected.float(), dtype)


def test_backend_window_and_soft_cap_on_mixed_batch():
    (query, key, value), cache, metadata = mixed_batch(16, 4, 2, 32, torch.float32)
    window, soft_cap = 9, 4.0
    torch_cache = tuple(c.clone() for c in cache)
    actual = TritonAttentionBackend().forward(query, key, value, cache, metadata, 0.2,
                                              sliding_window=window, soft_cap=soft_cap)
    expected = TorchAttentionBackend().forward(query, key, value, torch_cache, metadata, 0.2,
                                               sliding_window=window, soft_cap=soft_cap)
    assert_close(actual, expected, torch.float32)
    # and row by row against this file's own reference
    n = metadata.num_decodes
    for row in range(n):
        length = int(metadata.decode_seq_lens[row])
        table = metadata.decode_block_tables[row]
        expected = reference(query[row : row + 1], torch.tensor([length - 1], device=DEVICE),
                             gather(cache[0], table, length), gather(cache[1], table, length), 0.2,
                             window, soft_cap)
        assert_close(actual[row : row + 1], expected, torch.float32)
    for chunk in metadata.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        positions = torch.arange(chunk.context_len - chunk.query_len, chunk.context_len,
                                 device=DEVICE)
        expected = reference(query[rows], positions, gather(cache[0], chunk.block_table,
                             chunk.context_len), gather(cache[1], chunk.block_table,
                             chunk.context_len), 0.2, window, soft_cap)
        assert_close(actual[rows], expected, torch.float32)
