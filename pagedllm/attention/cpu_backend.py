"""The CPU backend: the PyTorch backend with decode attention and the K/V write in C++.

The kernel (paged_decode_attention in pagedllm/csrc/cpu_ops.cpp) reads each decoding sequence's
keys and values in place through its block table, so the decode path copies no cache memory;
prefill chunks keep SDPA, which is already efficient for many query rows.
"""

from __future__ import annotations

from types import ModuleType

import torch

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.attention.torch_backend import TorchAttentionBackend
from pagedllm.ops.cpu import KERNEL_DTYPES


class CpuAttentionBackend(TorchAttentionBackend):
    def __init__(self, ops: ModuleType) -> None:
        self.ops = ops

    def write_kv(self, kv_cache, key, value, slot_mapping) -> None:
        if key.dtype not in KERNEL_DTYPES:
            return super().write_kv(kv_cache, key, value, slot_mapping)
        self.ops.write_kv(key, value, kv_cache[0], kv_cache[1], slot_mapping)

    def _decode(self, query, kv_cache, metadata: AttentionMetadata, scale, sliding_window=None,
                soft_cap=None):
        if query.dtype not in KERNEL_DTYPES:
            return super()._decode(query, kv_cache, metadata, scale, sliding_window, soft_cap)
        out = torch.empty_like(query)
        self.ops.paged_decode_attention(out, query.contiguous(), kv_cache[0], kv_cache[1],
                                        metadata.decode_block_tables, metadata.decode_seq_lens,
                                        scale, sliding_window or 0, soft_cap or 0.0)
        return out
