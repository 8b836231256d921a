"""Host memory for swapped-out KV blocks, and the copies between it and the device pools.

The device keeps one pool per layer, [num_blocks, block_size, kv_heads, head_dim] for K and for
V. The host pool is laid out block-major instead,

    host[block] = [layers, 2 (K, V), block_size, kv_heads, head_dim]     one contiguous piece

so that moving one block between host and device is a single copy. On CUDA the host pool is
pinned and every copy is asynchronous on the current stream: it is ordered before the forward
pass that follows, which may overwrite a device block just copied out or read one just copied in,
and the CPU itself never reads the host pool, so no synchronisation is needed. On the CPU the
same code runs as plain memory copies between two tensors.

Block ids come from core/ (the device BlockPool and the host BlockPool) as plain (src, dst) lists.
"""

from __future__ import annotations

import torch

from pagedllm.attention.kv_quant import as_bytes

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


class SwapSpace:
    def __init__(self, kv_caches: KVCaches, num_blocks: int) -> None:
        key_cache = kv_caches[0][0]
        self.kv_caches = kv_caches
        self.device = key_cache.device
        block_shape = (len(kv_caches), 2, *key_cache.shape[1:])
        # Never read before written (a host block is only read after a swap-out filled it), so
        # `empty` is enough; on the CPU that leaves the pages untouched until they are used.
        self.host = torch.empty((num_blocks, *block_shape), dtype=key_cache.dtype, device="cpu",
                                pin_memory=key_cache.is_cuda)

    @property
    def num_blocks(self) -> int:
        return self.host.shape[0]

    def swap_out(self, copies: list[tuple[int, int]]) -> None:
        """(device block, host block) pairs: gather the blocks on the device, then one copy
        per block into host memory."""
        if not copies:
            return
        src = self._index([device_id for device_id, _ in copies])
        staged = torch.stack([torch.stack((k.index_select(0, src), v.index_select(0, src)), dim=1)
                              for k, v in self.kv_caches], dim=1)  # [n, layers, 2, ...]
        for row, (_, host_id) in enumerate(copies):
            self.host[host_id].copy_(staged[row], non_blocking=True)

    def swap_in(self, copies: list[tuple[int, int]]) -> None:
        """(host block, device block) pairs: one copy per block to the device, then scatter
        into every layer's pools."""
        if not copies:
            return
        staged = torch.empty((len(copies), *self.host.shape[1:]), dtype=self.host.dtype,
                             device=self.device)
        for row, (host_id, _) in enumerate(copies):
            staged[row].copy_(self.host[host_id], non_blocking=True)
        dst = self._index([device_id for _, device_id in copies])
        for layer, (key_cache, value_cache) in enumerate(self.kv_caches):
            # as bytes: an fp8 pool has no index_copy_ kernel on the CPU
            as_bytes(key_cache).index_copy_(0, dst, as_bytes(staged[:, layer, 0]))
            as_bytes(value_cache).index_copy_(0, dst, as_bytes(staged[:, layer, 1]))

    def _index(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)
