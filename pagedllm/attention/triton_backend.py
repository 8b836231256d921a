"""Paged attention on CUDA through the Triton kernels of triton_ops.

Per layer: write the new tokens' K/V into the pools, one split-over-context decode launch for all
decode rows (capturable in a CUDA graph: it reads only tensors and shapes), one launch for all
prefill chunks; an fp8 cache is quantized on the write and widened in the kernels, with the layer's
scales read from a device tensor. The prefill plan (chunk tiles, concatenated block tables) is built from
metadata.prefills once per step and reused by every layer.
"""

from __future__ import annotations

import torch

from pagedllm.attention import triton_ops
from pagedllm.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.attention.kv_quant import KVScales, is_fp8
from pagedllm.attention.torch_backend import NO_SCALES


class TritonAttentionBackend(AttentionBackend):
    def __init__(self) -> None:
        # One step's prefill plan and what it was built for. Holding the metadata object keeps it
        # alive, so a later step's metadata can never be mistaken for it.
        self._plan_for: tuple[AttentionMetadata, int, int, torch.dtype] | None = None
        self._plan: triton_ops.PrefillPlan | None = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
        kv_scales: KVScales | None = None,
    ) -> torch.Tensor:
        key_cache, value_cache = kv_cache
        kv_scales = kv_scales or NO_SCALES
        kv_scales.observe(key, value)
        scales = kv_scales.tensors if is_fp8(key_cache.dtype) else None
        triton_ops.write_kv(key, value, key_cache, value_cache, metadata.slot_mapping, scales)
        output = torch.empty_like(query)
        n = metadata.num_decodes
        if n:
            triton_ops.decode_attention(
                output[:n], query[:n], key_cache, value_cache, metadata.decode_block_tables,
                metadata.decode_seq_lens, scale, sliding_window, soft_cap, scales=scales)
        if metadata.prefills:
            group = query.shape[1] // key_cache.shape[2]
            plan = self._prefill_plan(metadata, group, query.shape[2], query.dtype)
            triton_ops.prefill_attention(output, query, key_cache, value_cache, plan, scale,
                                         sliding_window, soft_cap, scales=scales)
        return output

    def _prefill_plan(self, metadata: AttentionMetadata, group: int, head_dim: int,
                      dtype: torch.dtype) -> triton_ops.PrefillPlan:
        planned = self._plan_for
        if self._plan is None or planned is None or planned[0] is not metadata \
                or planned[1:] != (group, head_dim, dtype):
            chunks = metadata.prefills
            self._plan = triton_ops.plan_prefill(
                [c.query_start for c in chunks], [c.query_len for c in chunks],
                [c.context_len for c in chunks], [c.block_table for c in chunks], group, head_dim,
                dtype)
            self._plan_for = (metadata, group, head_dim, dtype)
        return self._plan
