"""Bidirectional attention over a flat batch of whole sequences (attention/encoder.py): bucketed
and padded, it equals each sequence attending on its own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.attention.encoder import EncoderBatch, bidirectional_attention


@pytest.mark.parametrize("seq_lens", [[7], [1, 3, 50, 7, 120, 2, 2, 64], [5, 5, 5]])
def test_equals_each_sequence_attending_alone(seq_lens):
    torch.manual_seed(0)
    qkv = torch.randn(sum(seq_lens), 3, 4, 16)
    out = bidirectional_attention(qkv, EncoderBatch.build(seq_lens, qkv.device), 0.25)
    start = 0
    for length in seq_lens:
        q, k, v = qkv[start : start + length].permute(1, 2, 0, 3)[:, None].unbind(0)
        expected = F.scaled_dot_product_attention(q, k, v, scale=0.25)[0].transpose(0, 1)
        torch.testing.assert_close(out[start : start + length], expected, atol=1e-5, rtol=1e-5)
        start += length


def test_buckets_hold_sequences_of_similar_length():
    batch = EncoderBatch.build([1, 3, 50, 7, 120, 2, 2, 64], torch.device("cpu"))
    widths = [b.valid.shape[1] for b in batch.buckets]
    assert widths[0] == 120 and len(widths) > 1
    assert sum(int(b.valid.sum()) for b in batch.buckets) == 249
