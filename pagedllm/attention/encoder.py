"""Bidirectional attention over whole sequences in one flat batch (encoder models: BERT).

An encoder's pooling request runs its whole prompt in one step and keeps no KV, so nothing here
reads the paged cache. The flat batch's sequences are gathered into a padded
[num_seqs, heads, longest, head_dim] tensor and attend with a key-padding mask in one SDPA call;
only the real rows come back, in the flat order. The padding costs attention alone: the
projections and the MLP around it run on the flat, unpadded rows.

    flat:    a0 a1 a2 | b0 | c0 c1        seq_lens [3, 1, 2]
    padded:  a0 a1 a2
             b0 .  .                      (. masked as keys; their query rows are dropped)
             c0 c1 .
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def padded_index(seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_seqs, longest] flat-row index of each padded place (0 where padding), and the mask
    of the real places."""
    starts = torch.cumsum(seq_lens, 0) - seq_lens
    width = int(seq_lens.max())
    offsets = torch.arange(width, device=seq_lens.device)
    valid = offsets[None, :] < seq_lens[:, None]
    index = torch.where(valid, starts[:, None] + offsets[None, :], 0)
    return index, valid


def bidirectional_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """query/key/value [num_tokens, heads, head_dim] -> [num_tokens, heads, head_dim], each
    token attending to every token of its own sequence."""
    if seq_lens.numel() == 1:  # one sequence: no padding, no mask
        q, k, v = (t.transpose(0, 1)[None] for t in (query, key, value))
        return F.scaled_dot_product_attention(q, k, v, scale=scale)[0].transpose(0, 1)
    index, valid = padded_index(seq_lens)
    q, k, v = (t[index].transpose(1, 2) for t in (query, key, value))  # [seqs, heads, W, dim]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=scale)
    return out.transpose(1, 2)[valid]
