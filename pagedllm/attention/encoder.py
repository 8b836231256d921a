"""Bidirectional attention over whole sequences in one flat batch (encoder models: BERT).

An encoder's pooling request runs its whole prompt in one step and keeps no KV, so nothing here
reads the paged cache. The flat batch's sequences are sorted by length and cut into buckets of
similar lengths; each bucket is gathered into a padded [seqs, heads, longest, head_dim] tensor
and attends with a key-padding mask in one SDPA call, and only its real rows are scattered back
to their flat places. The padding costs attention alone (the projections and the MLP around it
run on the flat, unpadded rows), and bucketing keeps it small when short and long sentences
share a step.

    flat:    a0 a1 a2 | b0 | c0 c1        seq_lens [3, 1, 2]
    bucket:  a0 a1 a2
             c0 c1 .                      (. masked as keys; its query row is dropped)
             b0 .  .
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BUCKET_SLACK = 1.5  # a bucket's longest sequence is at most this times its shortest (+ 8)


@dataclass(slots=True)
class Bucket:
    index: torch.Tensor  # [seqs * longest] flat row of each padded place (0 where padding)
    valid: torch.Tensor  # [seqs, longest] the real places
    places: torch.Tensor  # [real places] where each is in the padded [seqs * longest]
    rows: torch.Tensor  # [real places] its flat row


@dataclass(slots=True)
class EncoderBatch:
    """The sequences of one flat batch, bucketed for attention; built once per forward pass and
    shared by every layer."""

    buckets: list[Bucket]
    single: bool  # one sequence: attention needs neither padding nor a mask

    @classmethod
    def build(cls, seq_lens: list[int], device: torch.device) -> EncoderBatch:
        if len(seq_lens) == 1:
            return cls([], True)
        starts = [0]
        for length in seq_lens[:-1]:
            starts.append(starts[-1] + length)
        order = sorted(range(len(seq_lens)), key=seq_lens.__getitem__, reverse=True)
        return cls([_bucket([starts[i] for i in group], [seq_lens[i] for i in group], device)
                    for group in _groups(order, seq_lens)], False)


def _groups(order: list[int], seq_lens: list[int]) -> list[list[int]]:
    """Consecutive runs of the length-sorted (longest first) sequences, each ending where a
    sequence is much shorter than the run's first."""
    groups: list[list[int]] = []
    for i in order:
        if groups and seq_lens[groups[-1][0]] <= BUCKET_SLACK * seq_lens[i] + 8:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _bucket(starts: list[int], lengths: list[int], device: torch.device) -> Bucket:
    starts_t = torch.tensor(starts, device=device)
    lengths_t = torch.tensor(lengths, device=device)
    offsets = torch.arange(max(lengths), device=device)
    valid = offsets[None, :] < lengths_t[:, None]
    index = torch.where(valid, starts_t[:, None] + offsets[None, :], 0).flatten()
    places = valid.flatten().nonzero().flatten()
    return Bucket(index, valid, places, index[places])


def bidirectional_attention(qkv: torch.Tensor, batch: EncoderBatch,
                            scale: float) -> torch.Tensor:
    """qkv [num_tokens, 3, heads, head_dim] -> [num_tokens, heads, head_dim], each token
    attending to every token of its own sequence."""
    if batch.single:
        q, k, v = qkv.permute(1, 2, 0, 3)[:, None].unbind(0)  # each [1, heads, tokens, dim]
        return F.scaled_dot_product_attention(q, k, v, scale=scale)[0].transpose(0, 1)
    num_tokens, _, heads, dim = qkv.shape
    # Gathers and scatters on 2-D row views: index_select copies whole rows there, several
    # times faster than on the 4-D tensor.
    flat_qkv = qkv.reshape(num_tokens, 3 * heads * dim)
    out = qkv.new_empty(num_tokens, heads * dim)
    for bucket in batch.buckets:
        seqs, width = bucket.valid.shape
        padded = flat_qkv.index_select(0, bucket.index).view(seqs, width, 3, heads, dim)
        q, k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)  # each [seqs, heads, W, dim]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bucket.valid[:, None, None],
                                                  scale=scale)
        rows = attended.transpose(1, 2).reshape(seqs * width, heads * dim)
        out.index_copy_(0, bucket.rows, rows.index_select(0, bucket.places))
    return out.view(num_tokens, heads, dim)
