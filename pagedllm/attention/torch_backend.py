"""Paged attention in plain PyTorch: the CPU backend.

Decode: one batched computation for every decoding sequence. Each sequence's blocks are gathered
through the padded block table into a [num_decodes, kv_heads, max_context, head_dim] tensor,
positions past a sequence's length are masked, and two matmuls and a softmax cover the batch.

Prefill chunks: a chunk whose sequence has no cached prefix attends causally to its own new keys;
a chunk after a cached prefix (prefix hit, later chunk of a long prompt, recompute) reads its
whole context through its block table with a causal mask shifted by the prefix length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata, PrefillChunk


def write_kv(kv_cache: tuple[torch.Tensor, torch.Tensor], key: torch.Tensor,
             value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    key_cache, value_cache = kv_cache
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def gather_context(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[..., blocks] block ids -> [..., kv_heads, blocks * block_size, head_dim]."""
    gathered = cache[block_tables]  # [..., blocks, block_size, kv_heads, head_dim]
    *lead, blocks, block_size, heads, dim = gathered.shape
    return gathered.view(*lead, blocks * block_size, heads, dim).transpose(-3, -2)


class TorchAttentionBackend(AttentionBackend):
    def forward(self, query, key, value, kv_cache, metadata: AttentionMetadata, scale):
        self.write_kv(kv_cache, key, value, metadata.slot_mapping)
        output = torch.empty_like(query)
        n = metadata.num_decodes
        if n:
            output[:n] = self._decode(query[:n], kv_cache, metadata, scale)
        for chunk in metadata.prefills:
            rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            output[rows] = self._prefill(query[rows], key[rows], value[rows], kv_cache, chunk, scale)
        return output

    def write_kv(self, kv_cache, key, value, slot_mapping) -> None:
        write_kv(kv_cache, key, value, slot_mapping)

    def _decode(self, query, kv_cache, metadata: AttentionMetadata, scale):
        """Two batched matmuls with the query heads grouped under their KV head (GQA without
        repeating K/V); on CPU this beats SDPA's masked path several times for one query row."""
        keys = gather_context(kv_cache[0], metadata.decode_block_tables)  # [n, kv, ctx, dim]
        values = gather_context(kv_cache[1], metadata.decode_block_tables)
        n, kv_heads, context, dim = keys.shape
        grouped = query.view(n, kv_heads, -1, dim)  # [n, kv, group, dim]
        scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale
        positions = torch.arange(context, device=query.device)
        hidden = positions[None, :] >= metadata.decode_seq_lens[:, None]  # [n, ctx]
        scores.masked_fill_(hidden[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        return torch.matmul(probs, values).view(n, -1, dim)

    def _prefill(self, query, key, value, kv_cache, chunk: PrefillChunk, scale):
        # SDPA gets 4-D [1, heads, len, dim] inputs: with 3-D ones the CPU build falls back to
        # its slow "math" path instead of the flash kernel.
        q = query.transpose(0, 1)[None]
        if chunk.context_len == chunk.query_len:  # no cached prefix: the new keys are all there is
            out = F.scaled_dot_product_attention(
                q, key.transpose(0, 1)[None], value.transpose(0, 1)[None],
                is_causal=True, scale=scale, enable_gqa=True,
            )
            return out[0].transpose(0, 1)
        keys = gather_context(kv_cache[0], chunk.block_table)[:, : chunk.context_len]
        values = gather_context(kv_cache[1], chunk.block_table)[:, : chunk.context_len]
        prefix = chunk.context_len - chunk.query_len
        q_pos = torch.arange(chunk.query_len, device=query.device)[:, None] + prefix
        k_pos = torch.arange(chunk.context_len, device=query.device)[None, :]
        out = F.scaled_dot_product_attention(
            q, keys[None], values[None], attn_mask=k_pos <= q_pos, scale=scale, enable_gqa=True,
        )
        return out[0].transpose(0, 1)
