"""The CPU backend: the PyTorch backend with attention and the K/V write in C++.

Decode: paged_decode_attention (pagedllm/csrc/decode_attention.cpp) reads each decoding
sequence's keys and values in place through its block table, so the decode path copies no cache
memory.

Prefill: paged_prefill_attention (pagedllm/csrc/prefill_attention.cpp) runs every chunk of the
step in one call, tiled with an online softmax in float32, reading cached prefixes in place. Its
chunk description ([num_chunks, 3] rows and padded block tables) is built once per step and
reused by every layer. All three kernels take an fp8 cache (attention/kv_quant.py) with the
layer's scales. Dtypes the kernels do not take keep the PyTorch path, and so does bf16 on
CPUs with AMX: there SDPA's bf16 matmuls run on the tiles, about 1.5x the kernel's float32 rate
(benchmarks/prefill_attention.py on Sapphire Rapids: ~200 vs ~130 GFLOP/s); without AMX (Zen 4,
AVX2) the kernel is the faster one.
"""

from __future__ import annotations

from types import ModuleType

import torch

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.attention.kv_quant import is_fp8
from pagedllm.attention.torch_backend import NO_SCALES, TorchAttentionBackend
from pagedllm.ops.cpu import KERNEL_DTYPES
from pagedllm.platform.cpu import cpu_info


class CpuAttentionBackend(TorchAttentionBackend):
    def __init__(self, ops: ModuleType) -> None:
        self.ops = ops
        self.sdpa_for_bf16_prefill = cpu_info().amx_bf16
        # One step's chunk tensors and the metadata they describe. Holding the metadata object
        # keeps it alive, so a later step's metadata can never be mistaken for it.
        self._chunks_for: AttentionMetadata | None = None
        self._chunks: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, query, key, value, kv_cache, metadata: AttentionMetadata, scale,
                sliding_window=None, soft_cap=None, kv_scales=None):
        kv_scales = kv_scales or NO_SCALES
        if not metadata.prefills or not self._prefill_kernel_takes(query, kv_cache):
            return super().forward(query, key, value, kv_cache, metadata, scale, sliding_window,
                                   soft_cap, kv_scales)
        kv_scales.observe(key, value)
        self.write_kv(kv_cache, key, value, metadata.slot_mapping, kv_scales)
        query = query.contiguous()
        output = torch.empty_like(query)
        n = metadata.num_decodes
        if n:
            output[:n] = self._decode(query[:n], kv_cache, metadata, scale, sliding_window,
                                      soft_cap, kv_scales)
        self._prefill_chunks(output, query, kv_cache, metadata, scale, sliding_window, soft_cap,
                             kv_scales)
        return output

    def write_kv(self, kv_cache, key, value, slot_mapping, kv_scales=NO_SCALES) -> None:
        if key.dtype not in KERNEL_DTYPES:
            return super().write_kv(kv_cache, key, value, slot_mapping, kv_scales)
        self.ops.write_kv(key, value, kv_cache[0], kv_cache[1], slot_mapping, kv_scales.k_scale,
                          kv_scales.v_scale)

    def _decode(self, query, kv_cache, metadata: AttentionMetadata, scale, sliding_window=None,
                soft_cap=None, kv_scales=NO_SCALES):
        if query.dtype not in KERNEL_DTYPES:
            return super()._decode(query, kv_cache, metadata, scale, sliding_window, soft_cap,
                                   kv_scales)
        out = torch.empty_like(query)
        self.ops.paged_decode_attention(out, query.contiguous(), kv_cache[0], kv_cache[1],
                                        metadata.decode_block_tables, metadata.decode_seq_lens,
                                        scale, sliding_window or 0, soft_cap or 0.0,
                                        kv_scales.k_scale, kv_scales.v_scale)
        return out

    def _prefill_chunks(self, output, query, kv_cache, metadata: AttentionMetadata, scale,
                        sliding_window=None, soft_cap=None, kv_scales=NO_SCALES) -> None:
        """Every prefill chunk's rows of `output`, in one kernel call."""
        chunks, block_tables = self._chunk_tensors(metadata)
        self.ops.paged_prefill_attention(output, query, kv_cache[0], kv_cache[1], chunks,
                                         block_tables, scale, sliding_window or 0,
                                         soft_cap or 0.0, kv_scales.k_scale, kv_scales.v_scale)

    def _chunk_tensors(self, metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """[num_chunks, 3] (query_start, query_len, context_len) and the block tables padded
        with block 0 to [num_chunks, max_blocks]; built on the step's first layer."""
        if self._chunks is None or self._chunks_for is not metadata:
            prefills = metadata.prefills
            chunks = torch.tensor([[c.query_start, c.query_len, c.context_len] for c in prefills],
                                  dtype=torch.long)
            width = max(len(c.block_table) for c in prefills)
            block_tables = torch.zeros(len(prefills), width, dtype=torch.long)
            for row, chunk in zip(block_tables, prefills):
                row[: len(chunk.block_table)] = chunk.block_table
            self._chunks, self._chunks_for = (chunks, block_tables), metadata
        return self._chunks

    def _prefill_kernel_takes(self, query: torch.Tensor, kv_cache) -> bool:
        if query.dtype == torch.bfloat16 and self.sdpa_for_bf16_prefill:
            return False
        return query.dtype in KERNEL_DTYPES and all(
            c.dtype == query.dtype or is_fp8(c.dtype) for c in kv_cache)
