"""Per-request block tables on top of the block pool, and the prefix cache.

A request's block table maps its token positions to physical blocks: position p lives in block
`table[p // block_size]` at offset `p % block_size`. Blocks are added only when the tokens
scheduled in a step would spill past the last one, so at most one partly filled block per request
holds empty slots.

Prefix caching: every full block of a request gets a hash that chains the parent block's hash,
the block's token ids and extra keys (the tenant's cache_salt, in the first block only; the chain
carries it on):

    h0 = H(b"", tokens[0:16], salt)    h1 = H(h0, tokens[16:32])    h2 = H(h1, tokens[32:48]) ...

Equal hashes therefore mean equal whole prefixes. A new request takes over the longest run of
cached blocks that matches its prompt (by reference count, no copy) and computes only the rest;
at least its last prompt token is always computed so that the step produces logits.
"""

from __future__ import annotations

import hashlib
from array import array

from pagedllm.core.block_pool import BlockPool, KVCacheBlock
from pagedllm.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hash_block(parent: bytes | None, token_ids: list[int], extra: bytes = b"") -> bytes:
    digest = hashlib.sha256(parent or b"")
    digest.update(array("q", token_ids).tobytes())
    digest.update(extra)
    return digest.digest()


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self._blocks: dict[str, list[KVCacheBlock]] = {}
        self._block_ids: dict[str, list[int]] = {}  # the same tables as plain ints, for the runner
        self._hashes: dict[str, list[bytes]] = {}  # hashes of each request's full blocks
        self._num_cached: dict[str, int] = {}  # how many of its blocks are registered
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0

    @property
    def caching(self) -> bool:
        return self.pool.enable_caching

    def block_ids(self, request_id: str) -> list[int]:
        return self._block_ids.get(request_id, [])

    def blocks(self, request_id: str) -> list[KVCacheBlock]:
        return self._blocks.get(request_id, [])

    # ---- prefix cache -------------------------------------------------------------------------
    def block_hashes(self, request: Request) -> list[bytes]:
        """Hashes of the request's full blocks, extended as its tokens grow."""
        hashes = self._hashes.setdefault(request.request_id, [])
        bs = self.block_size
        while len(hashes) < request.num_tokens // bs:
            index = len(hashes)
            extra = request.cache_salt.encode() if index == 0 and request.cache_salt else b""
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, request.all_token_ids[index * bs:(index + 1) * bs],
                                     extra))
        return hashes

    def get_computed_blocks(self, request: Request) -> list[KVCacheBlock]:
        """The longest run of cached blocks that starts the request's tokens."""
        if not self.caching or request.num_computed_tokens:
            return []
        if request.sampling_params.prompt_logprobs is not None:
            return []  # cached tokens produce no logits, and these are wanted
        limit = (request.num_tokens - 1) // self.block_size  # leave the last token to compute
        hits = []
        for block_hash in self.block_hashes(request)[:limit]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    # ---- allocation ---------------------------------------------------------------------------
    def num_blocks_needed(self, request: Request, num_new_tokens: int,
                          computed: list[KVCacheBlock] = ()) -> int:
        tokens = request.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        have = len(self._blocks.get(request.request_id, ())) + len(computed)
        return max(0, cdiv(tokens, self.block_size) - have)

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed: list[KVCacheBlock] = ()) -> bool:
        """Make room for `num_new_tokens` more tokens after the request's computed ones (and
        after `computed`, cached blocks it takes over); False, with no change, if short."""
        needed = self.num_blocks_needed(request, num_new_tokens, computed)
        reclaimed = sum(1 for block in computed if block.ref_cnt == 0)  # leave the free queue
        if needed > self.pool.num_free_blocks - reclaimed:
            return False
        request_id = request.request_id
        table = self._blocks.setdefault(request_id, [])
        ids = self._block_ids.setdefault(request_id, [])
        if computed:
            self.pool.share(computed)
            table.extend(computed)
            ids.extend(b.block_id for b in computed)
        if request.num_computed_tokens == 0 and self.caching:
            self.num_queried_tokens += request.num_tokens
            self.num_hit_tokens += len(computed) * self.block_size
        new_blocks = self.pool.allocate(needed)
        table.extend(new_blocks)
        ids.extend(b.block_id for b in new_blocks)
        self._cache_full_blocks(request, len(computed) * self.block_size + num_new_tokens)
        return True

    def _cache_full_blocks(self, request: Request, num_new_tokens: int) -> None:
        """Register the blocks this step fills. K/V of all of a step's tokens are written before
        attention reads them, so a request admitted in the same step may already share them."""
        if not self.caching:
            return
        full = min(request.num_computed_tokens + num_new_tokens, request.num_tokens) // self.block_size
        start = self._num_cached.get(request.request_id, 0)
        if full <= start:
            return
        hashes = self.block_hashes(request)
        table = self._blocks[request.request_id]
        for index in range(start, full):
            self.pool.cache_block(table[index], hashes[index])
        self._num_cached[request.request_id] = full

    def free(self, request: Request) -> None:
        # Freed back to front: a request's tail blocks (least likely shared) are evicted first.
        blocks = self._blocks.pop(request.request_id, [])
        self._block_ids.pop(request.request_id, None)
        self._hashes.pop(request.request_id, None)
        self._num_cached.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def num_allocated_slots(self) -> int:
        return sum(len(b) for b in self._blocks.values()) * self.block_size
