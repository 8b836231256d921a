"""The C++ kernels against the PyTorch reference, for every kernel level this CPU executes
(the `ops` fixture in tests/conftest.py: portable, AVX2, AVX-512, AVX-512 with bf16).

Decode attention runs on random paged caches. Block tables are shuffled so that a sequence's
blocks are scattered through the pool, and the lengths end mid-block, on a block boundary and at
a single token.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.attention.cpu_backend import CpuAttentionBackend
from pagedllm.attention.torch_backend import TorchAttentionBackend

BLOCK_SIZE = 16


def random_decode_batch(seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype, num_blocks: int = 64):
    generator = torch.Generator().manual_seed(sum(seq_lens) + head_dim)
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=generator).to(dtype)
    value_cache = torch.randn(shape, generator=generator).to(dtype)
    width = max(-(-n // BLOCK_SIZE) for n in seq_lens)
    blocks = torch.randperm(num_blocks, generator=generator)[: width * len(seq_lens)]
    metadata = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long), num_decodes=len(seq_lens),
        decode_block_tables=blocks.view(len(seq_lens), width).contiguous(),
        decode_seq_lens=torch.tensor(seq_lens), prefills=[], block_size=BLOCK_SIZE)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=generator).to(dtype)
    return query, (key_cache, value_cache), metadata


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [
    (9, 3, 64),  # SmolLM2's GQA shape: the register-blocked path
    (4, 4, 32),  # no grouping
    (8, 1, 128),  # multi-query, wide heads
    (6, 2, 24),  # head_dim not a multiple of the vector width: the plain loop
])
def test_decode_kernel_matches_torch(ops, dtype, tolerance, num_heads, num_kv_heads, head_dim):
    seq_lens = [1, 15, 16, 17, 40, 100]
    query, kv_cache, metadata = random_decode_batch(seq_lens, num_heads, num_kv_heads, head_dim,
                                                    dtype)
    expected = TorchAttentionBackend()._decode(query, kv_cache, metadata, head_dim**-0.5)
    actual = CpuAttentionBackend(ops)._decode(query, kv_cache, metadata, head_dim**-0.5)
    assert actual.dtype == dtype and actual.shape == query.shape
    torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (6, 2, 24)])
@pytest.mark.parametrize("window,soft_cap", [(5, 0.0), (0, 3.0), (12, 2.0)])
def test_decode_kernel_window_and_soft_cap(ops, num_heads, num_kv_heads, head_dim, window,
                                           soft_cap):
    seq_lens = [1, 4, 5, 6, 17, 40]
    query, kv_cache, metadata = random_decode_batch(seq_lens, num_heads, num_kv_heads, head_dim,
                                                    torch.float32)
    query = query * 4  # scores large enough for the cap to bend them
    args = (query, kv_cache, metadata, head_dim**-0.5, window or None, soft_cap or None)
    expected = TorchAttentionBackend()._decode(*args)
    actual = CpuAttentionBackend(ops)._decode(*args)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_seqs", [1, 2, 33])  # one sequence splits its kv heads over threads
def test_decode_kernel_batch_sizes(ops, num_seqs):
    seq_lens = [(7 * i) % 90 + 1 for i in range(num_seqs)]
    query, kv_cache, metadata = random_decode_batch(seq_lens, 9, 3, 64, torch.float32, 256)
    expected = TorchAttentionBackend()._decode(query, kv_cache, metadata, 0.125)
    actual = CpuAttentionBackend(ops)._decode(query, kv_cache, metadata, 0.125)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_decode_kernel_rejects_mismatched_inputs(ops):
    query, (key_cache, value_cache), metadata = random_decode_batch([5], 4, 2, 32, torch.float32)
    out = torch.empty_like(query)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        ops.paged_decode_attention(out, query.bfloat16(), key_cache, value_cache,
                                   metadata.decode_block_tables, metadata.decode_seq_lens, 1.0,
                                   0, 0.0)
    with pytest.raises(RuntimeError, match="int64"):
        ops.paged_decode_attention(out, query, key_cache, value_cache,
                                   metadata.decode_block_tables.int(), metadata.decode_seq_lens,
                                   1.0, 0, 0.0)


def torch_reference_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("hidden", [96, 100])  # 100: a tail past the last whole vector
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernels_match_torch(ops, dtype, hidden):
    x = torch.randn(37, hidden).to(dtype)
    residual = torch.randn(37, hidden).to(dtype)
    weight = (torch.rand(hidden) + 0.5).to(dtype)
    # float32 sums may be ordered differently, which can move round(x / rms) by one bf16 ulp;
    # times w and rounded again that is up to two ulps of the output
    tolerance = 1e-6 if dtype == torch.float32 else 1.6e-2
    out = torch.empty_like(x)
    ops.rms_norm(out, x, weight, 1e-5)
    torch.testing.assert_close(out, torch_reference_norm(x, weight, 1e-5), atol=0, rtol=tolerance)

    expected_residual = x + residual
    expected = torch_reference_norm(expected_residual, weight, 1e-5)
    ops.fused_add_rms_norm(x, residual, weight, 1e-5)  # in place
    torch.testing.assert_close(residual, expected_residual, atol=0, rtol=0)
    torch.testing.assert_close(x, expected, atol=0, rtol=tolerance)


@pytest.mark.parametrize("width", [80, 77])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_torch(ops, dtype, width):
    gate_up = (torch.randn(19, 2 * width) * 4).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, -87.5, 0.0])  # exp's clamps and zero
    out = torch.empty(19, width, dtype=dtype)
    ops.silu_and_mul(out, gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    # bf16: one ulp either way where the two exp implementations round a value differently
    tolerance = 1e-6 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up, atol=1e-6, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 49152), (5, 1000), (3, 7), (2, 1)])
def test_argmax_kernel_matches_torch(ops, dtype, shape):
    """Greedy sampling's argmax: torch.argmax's index, ties to the first, NaN as the largest."""
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert torch.equal(ops.argmax(logits), logits.argmax(dim=-1))
    if shape[1] >= 7:
        logits[0, 3] = logits[0, shape[1] - 1] = logits[0].max() + 1  # a tie: the first wins
        logits[-1, :] = float("-inf")
        assert torch.equal(ops.argmax(logits), logits.argmax(dim=-1))
        logits[0, 5] = logits[0, 6] = float("nan")
        assert ops.argmax(logits)[0] == 5 == logits.argmax(dim=-1)[0]


@pytest.mark.parametrize("head_dim", [16, 64])  # half a head below and above a vector's width
@pytest.mark.parametrize("rotary_fraction", [1.0, 0.5])
def test_rotary_kernel_rotates_fused_qkv_in_place(ops, rotary_fraction, head_dim):
    from transformers import LlamaConfig

    from pagedllm.model.layers.rotary import RotaryEmbedding

    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                         partial_rotary_factor=rotary_fraction)
    rotary = RotaryEmbedding(config, head_dim=head_dim, max_model_len=64)
    positions = torch.tensor([0, 5, 63, 7])
    # q | k | v rows, as the fused projection makes them
    qkv = torch.randn(4, (4 + 2 + 2) * head_dim)
    q_end, k_end = 4 * head_dim, 6 * head_dim
    q, k = qkv[:, :q_end].view(4, 4, head_dim), qkv[:, q_end:k_end].view(4, 2, head_dim)
    expected_q, expected_k = (t.clone() for t in rotary_reference(rotary, positions, q, k))
    values_before = qkv[:, k_end:].clone()
    ops.rotary_embedding(positions, q, k, rotary.cos, rotary.sin)
    torch.testing.assert_close(q, expected_q, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(k, expected_k, atol=1e-6, rtol=1e-5)
    assert torch.equal(qkv[:, k_end:], values_before)


def rotary_reference(rotary, positions, q, k):
    """RotaryEmbedding's PyTorch path (kernels off for these tensors: they are float64)."""
    rotated_q, rotated_k = rotary(positions, q.double(), k.double())
    return rotated_q.float(), rotated_k.float()


def test_write_kv_kernel_fills_slots(ops):
    key = torch.randn(5, 2, 8).bfloat16()
    value = torch.randn(5, 2, 8).bfloat16()
    key_cache = torch.zeros(4, 4, 2, 8, dtype=torch.bfloat16)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.tensor([3, 4, 9, 15, 0])
    ops.write_kv(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache.view(-1, 2, 8)[slots], key)
    assert torch.equal(value_cache.view(-1, 2, 8)[slots], value)
    untouched = [s for s in range(16) if s not in slots.tolist()]
    assert not key_cache.view(-1, 2, 8)[untouched].any()


def test_kernels_name_themselves_when_handed_another_dtype(ops):
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="rms_norm supports float32 and bfloat16"):
        ops.rms_norm(torch.empty_like(x), x, torch.ones(8, dtype=torch.float64), 1e-5)
    query, (key_cache, value_cache), metadata = random_decode_batch([5], 4, 2, 32, torch.float64)
    with pytest.raises(RuntimeError, match="paged_decode_attention supports float32 and bfloat16"):
        ops.paged_decode_attention(torch.empty_like(query), query, key_cache, value_cache,
                                   metadata.decode_block_tables, metadata.decode_seq_lens, 1.0,
                                   0, 0.0)
