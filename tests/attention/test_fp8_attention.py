"""Attention on an fp8 KV cache (attention/kv_quant.py), every backend against one float64
reference computed on the dequantized keys and values: the C++ kernels at every kernel level this
CPU runs (the `ops` fixture), the PyTorch path, and the Triton kernels (in the interpreter without
a GPU). The only error left is the backends' own float32 arithmetic, so tolerances stay tight.
"""

from __future__ import annotations

import os

import pytest
import torch

from pagedllm.attention.backend import AttentionMetadata, PrefillChunk
from pagedllm.attention.cpu_backend import CpuAttentionBackend
from pagedllm.attention.kv_quant import (
    KVScales,
    cache_dtype,
    dequantize,
    quantize,
    round_trip,
)
from pagedllm.attention.torch_backend import TorchAttentionBackend, gather_context

BLOCK_SIZE = 16
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
K_SCALE, V_SCALE = 0.013, 0.021  # values of a few units land mid-range in fp8


def scales() -> KVScales:
    kv_scales = KVScales()
    kv_scales.set(K_SCALE, V_SCALE)
    return kv_scales


def fp8_cache(num_blocks: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int):
    """Random K/V pools quantized with the test's scales (values up to ~4, past e4m3's range
    for the largest ones: saturation is part of what is stored)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (num_blocks, BLOCK_SIZE, kv_heads, dim)
    keys, values = (torch.randn(shape, generator=generator) * 1.5 for _ in range(2))
    return quantize(keys, K_SCALE, dtype), quantize(values, V_SCALE, dtype)


def reference(query, kv_cache, block_table, context_len, query_positions, scale):
    """float64 attention of `query` [q, heads, dim] at `query_positions` over the dequantized
    context."""
    keys, values = (dequantize(gather_context(cache, block_table), s, torch.float64)
                    [:, :context_len] for cache, s in zip(kv_cache, (K_SCALE, V_SCALE)))
    group = query.shape[1] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    scores = torch.einsum("qhd,hkd->hqk", query.double(), keys) * scale
    visible = torch.arange(context_len)[None, :] <= query_positions[:, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqk,hkd->qhd", probs, values)


def decode_case(seq_lens, heads, kv_heads, dim, cache_type, query_type, seed=0):
    kv_cache = fp8_cache(64, kv_heads, dim, cache_type, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    width = max(-(-n // BLOCK_SIZE) for n in seq_lens)
    blocks = torch.randperm(64, generator=generator)[: width * len(seq_lens)]
    metadata = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long), num_decodes=len(seq_lens),
        decode_block_tables=blocks.view(len(seq_lens), width).contiguous(),
        decode_seq_lens=torch.tensor(seq_lens), prefills=[], block_size=BLOCK_SIZE)
    query = torch.randn(len(seq_lens), heads, dim, generator=generator).to(query_type)
    expected = torch.stack([
        reference(query[i : i + 1], kv_cache, metadata.decode_block_tables[i], n,
                  torch.tensor([n - 1]), dim**-0.5)[0]
        for i, n in enumerate(seq_lens)])
    return query, kv_cache, metadata, expected


@pytest.mark.parametrize("cache_type", FP8)
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (8, 1, 128), (6, 2, 24)])
def test_cpu_decode_kernel_reads_fp8_in_place(ops, cache_type, heads, kv_heads, dim):
    query, kv_cache, metadata, expected = decode_case([1, 15, 17, 40, 100], heads, kv_heads, dim,
                                                      cache_type, torch.float32)
    out = CpuAttentionBackend(ops)._decode(query, kv_cache, metadata, dim**-0.5, None, None,
                                           scales())
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("cache_type", FP8)
def test_cpu_decode_kernel_bf16_queries_on_fp8(ops, cache_type):
    query, kv_cache, metadata, expected = decode_case([3, 33, 64], 9, 3, 64, cache_type,
                                                      torch.bfloat16)
    out = CpuAttentionBackend(ops)._decode(query, kv_cache, metadata, 0.125, None, None, scales())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("cache_type", FP8)
def test_torch_decode_path_reads_fp8(cache_type):
    query, kv_cache, metadata, expected = decode_case([1, 16, 50], 4, 2, 32, cache_type,
                                                      torch.float32)
    out = TorchAttentionBackend()._decode(query, kv_cache, metadata, 32**-0.5, None, None,
                                          scales())
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


def prefill_case(cache_type, query_type, kv_heads=2, heads=6, dim=32, seed=3):
    """Two chunks after cached prefixes, behind one row of other work."""
    spec = [(17, 40), (5, 70)]  # (query_len, context_len)
    kv_cache = fp8_cache(16, kv_heads, dim, cache_type, seed)
    generator = torch.Generator().manual_seed(seed)
    free = torch.randperm(16, generator=generator)
    chunks, start, used = [], 1, 0
    for query_len, context_len in spec:
        count = -(-context_len // BLOCK_SIZE)
        chunks.append(PrefillChunk(start, query_len, context_len, free[used : used + count]))
        start, used = start + query_len, used + count
    query = torch.randn(start, heads, dim, generator=generator).to(query_type)
    expected = [reference(query[c.query_start : c.query_start + c.query_len], kv_cache,
                          c.block_table, c.context_len,
                          torch.arange(c.query_len) + c.context_len - c.query_len, dim**-0.5)
                for c in chunks]
    return query, kv_cache, chunks, expected


@pytest.mark.parametrize("cache_type", FP8)
def test_cpu_prefill_kernel_reads_fp8_prefix_in_place(ops, cache_type):
    query, kv_cache, chunks, expected = prefill_case(cache_type, torch.float32)
    backend = CpuAttentionBackend(ops)
    metadata = AttentionMetadata(torch.empty(0, dtype=torch.long), 0,
                                 torch.zeros(0, 0, dtype=torch.long),
                                 torch.zeros(0, dtype=torch.long), chunks, BLOCK_SIZE)
    out = torch.zeros_like(query)
    backend._prefill_chunks(out, query, kv_cache, metadata, 32**-0.5, None, None, scales())
    for chunk, want in zip(chunks, expected):
        got = out[chunk.query_start : chunk.query_start + chunk.query_len]
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("cache_type", FP8)
def test_torch_prefill_path_reads_fp8_prefix(cache_type):
    query, kv_cache, chunks, expected = prefill_case(cache_type, torch.float32)
    for chunk, want in zip(chunks, expected):
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        got = TorchAttentionBackend()._prefill(query[rows], None, None, kv_cache, chunk,
                                               32**-0.5, None, None, scales())
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("cache_type", FP8)
def test_cpu_write_kv_quantizes_like_the_reference(ops, cache_type):
    """The kernel stores what kv_quant.quantize stores, byte for byte, saturating past the
    range (no NaN), and leaves other slots alone."""
    generator = torch.Generator().manual_seed(5)
    key = torch.randn(7, 2, 24, generator=generator) * 3
    value = torch.randn(7, 2, 24, generator=generator) * 3
    key[0, 0, :4] = torch.tensor([1e6, -1e6, 0.0, 1e-12])  # beyond both fp8 ranges, and tiny
    slots = torch.tensor([3, 17, 18, 40, 41, 2, 63])
    caches = [torch.zeros(4, BLOCK_SIZE, 2, 24, dtype=cache_type) for _ in range(2)]
    ops.write_kv(key, value, caches[0], caches[1], slots, K_SCALE, V_SCALE)
    for cache, rows, scale in zip(caches, (key, value), (K_SCALE, V_SCALE)):
        stored = cache.view(-1, 2, 24)
        assert torch.equal(stored[slots].view(torch.uint8),
                           quantize(rows, scale, cache_type).view(torch.uint8))
        untouched = torch.ones(stored.shape[0], dtype=torch.bool)
        untouched[slots] = False
        assert not stored[untouched].float().any()
        assert not stored.float().isnan().any()
    assert caches[0].view(-1, 2, 24)[3, 0, 0].float() == torch.finfo(cache_type).max


def test_backend_forward_with_fp8_cache_matches_round_tripped_float_attention(ops):
    """A whole layer call (write, then attend): the fp8 backend equals the float backend fed
    keys and values already rounded through fp8."""
    generator = torch.Generator().manual_seed(9)
    tokens, heads, kv_heads, dim = 20, 6, 2, 32
    query, key, value = (torch.randn(tokens, h, dim, generator=generator)
                         for h in (heads, kv_heads, kv_heads))
    chunk = PrefillChunk(0, tokens, tokens, torch.tensor([2, 0]))
    metadata = AttentionMetadata(torch.cat([torch.arange(32, 48), torch.arange(0, 4)]), 0,
                                 torch.zeros(0, 0, dtype=torch.long),
                                 torch.zeros(0, dtype=torch.long), [chunk], BLOCK_SIZE)
    fp8 = [torch.zeros(3, BLOCK_SIZE, kv_heads, dim, dtype=torch.float8_e4m3fn)
           for _ in range(2)]
    out = CpuAttentionBackend(ops).forward(query, key, value, fp8, metadata, dim**-0.5,
                                           kv_scales=scales())
    rounded_k = round_trip(key, K_SCALE, torch.float8_e4m3fn)
    rounded_v = round_trip(value, V_SCALE, torch.float8_e4m3fn)
    floats = [torch.zeros(3, BLOCK_SIZE, kv_heads, dim) for _ in range(2)]
    want = TorchAttentionBackend().forward(query, rounded_k, rounded_v, floats, metadata,
                                           dim**-0.5)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def test_calculate_kv_scales_takes_the_first_batch_once():
    kv_scales = KVScales()
    kv_scales.calculate = True
    kv_scales.observe(torch.full((2, 1, 4), -50.0), torch.full((2, 1, 4), 10.0))
    assert kv_scales.k_scale == pytest.approx(0.25) and kv_scales.v_scale == pytest.approx(0.05)
    assert kv_scales.tensors.tolist() == pytest.approx([0.25, 0.05])
    kv_scales.observe(torch.full((1, 1, 4), 1000.0), torch.ones(1, 1, 4))
    assert kv_scales.k_scale == pytest.approx(0.25)  # only the first batch counts


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_scales_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match="k_scale must be a positive finite number"):
        KVScales().set(bad, 1.0)


def test_cache_dtype_names_the_choices():
    assert cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert cache_dtype("fp8", torch.float32) == torch.float8_e4m3fn
    assert cache_dtype("fp8_e5m2", torch.float32) == torch.float8_e5m2
    with pytest.raises(ValueError, match="auto, fp8, fp8_e4m3, fp8_e5m2"):
        cache_dtype("int8", torch.float32)


# --- Triton (the interpreter on CPU; compiled where a GPU runs the suite) ---------------------

@pytest.mark.triton
@pytest.mark.parametrize("cache_type", FP8)
@pytest.mark.parametrize("query_type,tolerance", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_triton_kernels_read_fp8(cache_type, query_type, tolerance):
    pytest.importorskip("triton")
    from pagedllm.attention import triton_ops
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU, and TRITON_INTERPRET is not 1")
    query, kv_cache, metadata, expected = decode_case([1, 17, 40], 4, 2, 32, cache_type,
                                                      query_type)
    to = lambda t: t.to(device)  # noqa: E731
    kv = [to(c) for c in kv_cache]
    device_scales = to(scales().tensors)
    out = torch.empty_like(to(query))
    triton_ops.decode_attention(out, to(query), kv[0], kv[1], to(metadata.decode_block_tables),
                                to(metadata.decode_seq_lens), 32**-0.5, scales=device_scales)
    torch.testing.assert_close(out.double().cpu(), expected, atol=tolerance, rtol=tolerance)

    query, kv_cache, chunks, expected = prefill_case(cache_type, query_type)
    kv = [to(c) for c in kv_cache]
    plan = triton_ops.plan_prefill([c.query_start for c in chunks], [c.query_len for c in chunks],
                                   [c.context_len for c in chunks],
                                   [to(c.block_table) for c in chunks], 3, 32, query_type)
    out = torch.zeros_like(to(query))
    triton_ops.prefill_attention(out, to(query), kv[0], kv[1], plan, 32**-0.5,
                                 scales=device_scales)
    for chunk, want in zip(chunks, expected):
        got = out[chunk.query_start : chunk.query_start + chunk.query_len].cpu()
        torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=tolerance)


@pytest.mark.triton
def test_triton_write_kv_quantizes_like_the_reference():
    pytest.importorskip("triton")
    from pagedllm.attention import triton_ops
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("no GPU, and TRITON_INTERPRET is not 1")
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    key = torch.randn(5, 2, 16) * 3
    value = torch.randn(5, 2, 16) * 3
    caches = [torch.zeros(2, BLOCK_SIZE, 2, 16, dtype=torch.float8_e4m3fn, device=device)
              for _ in range(2)]
    slots = torch.tensor([0, 5, 16, 31, -1])  # -1: a padding token, skipped
    triton_ops.write_kv(key.to(device), value.to(device), caches[0], caches[1],
                        slots.to(device), scales().tensors.to(device))
    for cache, rows, scale in zip(caches, (key, value), (K_SCALE, V_SCALE)):
        stored = cache.view(-1, 2, 16).cpu()
        assert torch.equal(stored[slots[:4]].view(torch.uint8),
                           quantize(rows[:4], scale, torch.float8_e4m3fn).view(torch.uint8))
