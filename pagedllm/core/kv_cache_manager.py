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

Forks (parallel sampling) share every block of the parent by reference count. Full blocks are
never written again, so sharing them is free; the last, partly filled block is copied on write:
the first sequence that appends to a shared partial block gets a fresh block and a pending copy
`(src, dst)`, which the runner performs before the step's forward pass.

Swapping (preemption_mode="swap"): a preempted request's table moves to host memory, block by
block, and comes back when it resumes, so it keeps its computed tokens:

    device table   [b3  b8  b5  b9]        b3, b8: full, cached, still used by another request
    swapped        [h=- h=- h0  h1]  + the hashes of all four
                     │   │   └───┴── copied out (device -> host), their device blocks freed
                     └───┴────────── left on the device: we only drop our reference; on resume
                                     they are found again by hash (no copy either way)

On resume each block with a hash is first looked up in the prefix cache (it may still be there
even if it was copied out); the rest are copied back into fresh device blocks. If a block that
was left behind has been evicted meanwhile, its content is gone and the request falls back to
recompute. Swapped requests hold no device block, so they can never keep each other out.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

from pagedllm.core.block_pool import BlockPool, KVCacheBlock
from pagedllm.core.request import Request
from pagedllm.utils import cdiv


def hash_block(parent: bytes | None, token_ids: list[int], extra: bytes = b"") -> bytes:
    digest = hashlib.sha256(parent or b"")
    digest.update(array("q", token_ids).tobytes())
    digest.update(extra)
    return digest.digest()


@dataclass(slots=True)
class SwappedBlock:
    """One entry of a swapped-out block table."""

    host: KVCacheBlock | None  # its copy in the host pool; None if it was left on the device
    block_hash: bytes | None  # to find it on the device again (prefix cache), if it is full


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, host_pool: BlockPool | None = None) -> None:
        self.pool = pool
        self.block_size = block_size
        self.host_pool = host_pool  # swap space; None when preemption recomputes
        self._swapped: dict[str, list[SwappedBlock]] = {}
        self._blocks: dict[str, list[KVCacheBlock]] = {}
        self._block_ids: dict[str, list[int]] = {}  # the same tables as plain ints, for the runner
        self._hashes: dict[str, list[bytes]] = {}  # hashes of each request's full blocks
        self._num_cached: dict[str, int] = {}  # how many of its blocks are registered
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0
        self.pending_copies: list[tuple[int, int]] = []  # copy-on-write, taken by the scheduler
        self.num_cow_copies = 0

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
        return max(0, cdiv(tokens, self.block_size) - have) + self._needs_copy(request)

    def _needs_copy(self, request: Request) -> bool:
        """Will the next token land in a partly filled block that another sequence shares?"""
        table = self._blocks.get(request.request_id)
        return bool(table) and request.num_computed_tokens % self.block_size != 0 \
            and table[-1].ref_cnt > 1

    def _copy_on_write(self, request: Request) -> None:
        table = self._blocks[request.request_id]
        shared = table[-1]
        (private,) = self.pool.allocate(1)
        self.pool.free([shared])
        table[-1] = private
        self._block_ids[request.request_id][-1] = private.block_id
        self.pending_copies.append((shared.block_id, private.block_id))
        self.num_cow_copies += 1

    def fork(self, parent: Request, child: Request) -> None:
        """Give `child` the parent's whole block table, shared by reference count."""
        blocks = self._blocks.get(parent.request_id, [])
        self.pool.share(blocks)
        self._blocks[child.request_id] = list(blocks)
        self._block_ids[child.request_id] = list(self._block_ids.get(parent.request_id, []))
        self._hashes[child.request_id] = list(self._hashes.get(parent.request_id, []))
        self._num_cached[child.request_id] = self._num_cached.get(parent.request_id, 0)

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed: list[KVCacheBlock] = ()) -> bool:
        """Make room for `num_new_tokens` more tokens after the request's computed ones (and
        after `computed`, cached blocks it takes over); False, with no change, if short."""
        needed = self.num_blocks_needed(request, num_new_tokens, computed)
        reclaimed = sum(1 for block in computed if block.ref_cnt == 0)  # leave the free queue
        if needed > self.pool.num_free_blocks - reclaimed:
            return False
        request_id = request.request_id
        if self._needs_copy(request):
            self._copy_on_write(request)
            needed -= 1
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
        self._drop_swapped(request.request_id)
        blocks = self._blocks.pop(request.request_id, [])
        self._block_ids.pop(request.request_id, None)
        self._hashes.pop(request.request_id, None)
        self._num_cached.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def num_empty_slots(self, requests: Iterable[Request]) -> int:
        """Allocated slots that hold no token yet: the unfilled end of each request's table
        (internal fragmentation). A last block shared by forks is counted once."""
        seen: set[int] = set()
        empty = 0
        for request in requests:
            table = self._blocks.get(request.request_id)
            if not table or table[-1].block_id in seen:
                continue
            seen.add(table[-1].block_id)
            empty += max(0, len(table) * self.block_size - request.num_computed_tokens)
        return empty

    # ---- swapping -----------------------------------------------------------------------------
    def is_swapped(self, request_id: str) -> bool:
        return request_id in self._swapped

    @property
    def num_swapped_requests(self) -> int:
        return len(self._swapped)

    def host_blocks(self, request_id: str) -> list[KVCacheBlock]:
        """The host-pool blocks a swapped-out request holds."""
        return [s.host for s in self._swapped.get(request_id, ()) if s.host is not None]

    def _stays_on_device(self, block: KVCacheBlock) -> bool:
        """A cached block another request still uses needs no copy: it stays resident for that
        owner, and its hash finds it again on resume."""
        return block.ref_cnt > 1 and block.block_hash is not None

    def swap_out(self, request: Request) -> list[tuple[int, int]] | None:
        """Move the request's blocks to the host pool; returns the copies to make, (device id,
        host id), or None (nothing changed) if the host pool is too full."""
        table = self._blocks.get(request.request_id, [])
        to_copy = [block for block in table if not self._stays_on_device(block)]
        if self.host_pool is None or len(to_copy) > self.host_pool.num_free_blocks:
            return None
        host_blocks = iter(self.host_pool.allocate(len(to_copy)))
        swapped, copies = [], []
        for block in table:
            host = None if self._stays_on_device(block) else next(host_blocks)
            swapped.append(SwappedBlock(host, block.block_hash))
            if host is not None:
                copies.append((block.block_id, host.block_id))
        self._swapped[request.request_id] = swapped
        del self._blocks[request.request_id], self._block_ids[request.request_id]
        self.pool.free(reversed(table))
        return copies

    def _find_on_device(self, swapped: list[SwappedBlock]) -> list[KVCacheBlock | None]:
        return [self.pool.lookup(s.block_hash) if s.block_hash is not None else None
                for s in swapped]

    def swap_lost(self, request: Request) -> bool:
        """Was a block it left on the device evicted since? Then it can only be recomputed."""
        swapped = self._swapped[request.request_id]
        found = self._find_on_device(swapped)
        return any(s.host is None and f is None for s, f in zip(swapped, found))

    def swap_in(self, request: Request, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Bring a swapped request's table back and make room for `num_new_tokens` more tokens;
        returns the copies to make, (host id, device id), or None (no change) if short of device
        blocks. Call only when `swap_lost` is False."""
        swapped = self._swapped[request.request_id]
        found = self._find_on_device(swapped)
        num_copies = sum(1 for f in found if f is None)
        reclaimed = sum(1 for f in found if f is not None and f.ref_cnt == 0)
        tokens = request.num_computed_tokens + num_new_tokens
        needed = num_copies + max(0, cdiv(tokens, self.block_size) - len(swapped))
        if needed > self.pool.num_free_blocks - reclaimed:
            return None
        # Claim the found blocks before allocating, or the allocation could evict them.
        self.pool.share(f for f in found if f is not None)
        fresh = iter(self.pool.allocate(num_copies))
        table, copies = [], []
        for entry, block in zip(swapped, found):
            if block is None:
                block = next(fresh)
                copies.append((entry.host.block_id, block.block_id))
            table.append(block)
        self._blocks[request.request_id] = table
        self._block_ids[request.request_id] = [b.block_id for b in table]
        self._drop_swapped(request.request_id)
        self._recache(request)
        assert self.allocate_slots(request, num_new_tokens)
        return copies

    def _recache(self, request: Request) -> None:
        """Make the blocks copied back in findable again (they came back without a hash)."""
        if not self.caching:
            return
        table = self._blocks[request.request_id]
        hashes = self.block_hashes(request)
        for index in range(min(self._num_cached.get(request.request_id, 0), len(table))):
            self.pool.cache_block(table[index], hashes[index])

    def _drop_swapped(self, request_id: str) -> None:
        swapped = self._swapped.pop(request_id, None)
        if swapped:
            self.host_pool.free(s.host for s in swapped if s.host is not None)
