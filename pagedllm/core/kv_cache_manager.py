"""Per-request block tables on top of the block pool.

A request's block table maps its token positions to physical blocks: position p lives in block
`table[p // block_size]` at offset `p % block_size`. Blocks are added only when the tokens
scheduled in a step would spill past the last one, so at most one partly filled block per request
holds empty slots.
"""

from __future__ import annotations

from pagedllm.core.block_pool import BlockPool, KVCacheBlock
from pagedllm.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self._blocks: dict[str, list[KVCacheBlock]] = {}
        self._block_ids: dict[str, list[int]] = {}  # the same tables as plain ints, for the runner

    def block_ids(self, request_id: str) -> list[int]:
        return self._block_ids.get(request_id, [])

    def num_blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(self._blocks.get(request.request_id, ())))

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more tokens; False (and no change) if the pool is short."""
        needed = self.num_blocks_needed(request, num_new_tokens)
        if needed > self.pool.num_free_blocks:
            return False
        if needed:
            new_blocks = self.pool.allocate(needed)
            self._blocks.setdefault(request.request_id, []).extend(new_blocks)
            self._block_ids.setdefault(request.request_id, []).extend(b.block_id for b in new_blocks)
        return True

    def free(self, request: Request) -> None:
        # Freed back to front so that a request's tail blocks are reused first.
        blocks = self._blocks.pop(request.request_id, [])
        self._block_ids.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def num_allocated_slots(self) -> int:
        return sum(len(b) for b in self._blocks.values()) * self.block_size
