"""Paged attention in plain PyTorch: the reference for the other backends, and the CPU's fallback
where the C++ kernels cannot be built or are turned off (PAGEDLLM_CPU_KERNELS=0).

Decode: one batched computation for every decoding sequence. Each sequence's blocks are gathered
through the padded block table into a [num_decodes, kv_heads, max_context, head_dim] tensor,
positions past a sequence's length are masked, and two matmuls and a softmax cover the batch.

Prefill chunks: a chunk whose sequence has no cached prefix attends causally to its own new keys;
a chunk after a cached prefix (prefix hit, later chunk of a long prompt, recompute) reads its
whole context through its block table with a causal mask shifted by the prefix length.

An fp8 cache (attention/kv_quant.py) is quantized as it is written and dequantized as it is
gathered; a chunk without a cached prefix uses its new keys and values rounded through the
cache's type, so every path computes on the values the cache holds.

A sliding window narrows every mask to the last `sliding_window` positions; a soft cap (which
SDPA cannot apply) takes the explicit path: scores, cap, mask, softmax, weighted sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata, PrefillChunk
from pagedllm.attention.kv_quant import KVScales, as_bytes, is_fp8, quantize, round_trip

NO_SCALES = KVScales()  # a layer without scales of its own: 1.0 (never changed)


def write_kv(kv_cache: tuple[torch.Tensor, torch.Tensor], key: torch.Tensor,
             value: torch.Tensor, slot_mapping: torch.Tensor,
             scales: KVScales = NO_SCALES) -> None:
    for cache, rows, scale in zip(kv_cache, (key, value), (scales.k_scale, scales.v_scale)):
        if is_fp8(cache.dtype):
            rows = quantize(rows, scale, cache.dtype).view(torch.uint8)
        as_bytes(cache).view(-1, *rows.shape[1:]).index_copy_(0, slot_mapping, rows)


def gather_context(cache: torch.Tensor, block_tables: torch.Tensor, scale: float = 1.0,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """[..., blocks] block ids -> [..., kv_heads, blocks * block_size, head_dim], in `dtype`
    (an fp8 cache dequantized with `scale`)."""
    gathered = cache[block_tables]  # [..., blocks, block_size, kv_heads, head_dim]
    if is_fp8(cache.dtype):
        gathered = (gathered.float() * scale).to(dtype)
    *lead, blocks, block_size, heads, dim = gathered.shape
    return gathered.view(*lead, blocks * block_size, heads, dim).transpose(-3, -2)


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Which keys each query may see: causal, and inside the window if there is one."""
    mask = k_pos <= q_pos
    if sliding_window:
        mask &= k_pos > q_pos - sliding_window
    return mask


def cap_scores(scores: torch.Tensor, soft_cap: float | None) -> torch.Tensor:
    return scores if not soft_cap else torch.tanh(scores / soft_cap) * soft_cap


def attend(q, keys, values, mask, scale: float, soft_cap: float | None) -> torch.Tensor:
    """q [1, heads, len, dim] over keys/values [1, kv_heads, ctx, dim] with a [len, ctx] mask."""
    if not soft_cap:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                              enable_gqa=True)
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = cap_scores(torch.matmul(q, keys.transpose(-1, -2)).float() * scale, soft_cap)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(probs.to(values.dtype), values)


class TorchAttentionBackend(AttentionBackend):
    def forward(self, query, key, value, kv_cache, metadata: AttentionMetadata, scale,
                sliding_window=None, soft_cap=None, kv_scales=None):
        kv_scales = kv_scales or NO_SCALES
        kv_scales.observe(key, value)
        self.write_kv(kv_cache, key, value, metadata.slot_mapping, kv_scales)
        output = torch.empty_like(query)
        n = metadata.num_decodes
        if n:
            output[:n] = self._decode(query[:n], kv_cache, metadata, scale, sliding_window,
                                      soft_cap, kv_scales)
        for chunk in metadata.prefills:
            rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            output[rows] = self._prefill(query[rows], key[rows], value[rows], kv_cache, chunk,
                                         scale, sliding_window, soft_cap, kv_scales)
        return output

    def write_kv(self, kv_cache, key, value, slot_mapping, kv_scales=NO_SCALES) -> None:
        write_kv(kv_cache, key, value, slot_mapping, kv_scales)

    def _decode(self, query, kv_cache, metadata: AttentionMetadata, scale, sliding_window=None,
                soft_cap=None, kv_scales=NO_SCALES):
        """Two batched matmuls with the query heads grouped under their KV head (GQA without
        repeating K/V); on CPU this beats SDPA's masked path several times for one query row."""
        tables = metadata.decode_block_tables
        keys = gather_context(kv_cache[0], tables, kv_scales.k_scale, query.dtype)
        values = gather_context(kv_cache[1], tables, kv_scales.v_scale, query.dtype)
        n, kv_heads, context, dim = keys.shape
        grouped = query.view(n, kv_heads, -1, dim)  # [n, kv, group, dim]
        scores = cap_scores(torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale,
                            soft_cap)
        k_pos = torch.arange(context, device=query.device)[None, :]
        q_pos = metadata.decode_seq_lens[:, None] - 1
        hidden = ~visible(q_pos, k_pos, sliding_window)  # [n, ctx]
        scores.masked_fill_(hidden[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        return torch.matmul(probs, values).view(n, -1, dim)

    def _prefill(self, query, key, value, kv_cache, chunk: PrefillChunk, scale,
                 sliding_window=None, soft_cap=None, kv_scales=NO_SCALES):
        # SDPA gets 4-D [1, heads, len, dim] inputs: with 3-D ones the CPU build falls back to
        # its slow "math" path instead of the flash kernel.
        q = query.transpose(0, 1)[None]
        k_scale, v_scale = kv_scales.k_scale, kv_scales.v_scale
        if chunk.context_len == chunk.query_len:  # no cached prefix: the new keys are all there is
            keys = round_trip(key, k_scale, kv_cache[0].dtype).transpose(0, 1)
            values = round_trip(value, v_scale, kv_cache[1].dtype).transpose(0, 1)
            if not sliding_window and not soft_cap:
                out = F.scaled_dot_product_attention(q, keys[None], values[None], is_causal=True,
                                                     scale=scale, enable_gqa=True)
                return out[0].transpose(0, 1)
        else:
            keys = gather_context(kv_cache[0], chunk.block_table, k_scale, query.dtype)
            values = gather_context(kv_cache[1], chunk.block_table, v_scale, query.dtype)
            keys, values = keys[:, : chunk.context_len], values[:, : chunk.context_len]
        prefix = chunk.context_len - chunk.query_len
        q_pos = torch.arange(chunk.query_len, device=query.device)[:, None] + prefix
        k_pos = torch.arange(chunk.context_len, device=query.device)[None, :]
        mask = visible(q_pos, k_pos, sliding_window)
        return attend(q, keys[None], values[None], mask, scale, soft_cap)[0].transpose(0, 1)
