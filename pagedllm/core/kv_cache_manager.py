"""Per-request block tables on top of the block pool, and the prefix cache.

A request's block table maps its token positions to physical blocks: position p lives in block
`table[p // block_size]` at offset `p % block_size`. Blocks are added only when the tokens
scheduled in a step would spill past the last one, so at most one partly filled block per request
holds empty slots.

Prefix caching: every full block of a request gets a hash that chains the parent block's hash,
the block's token ids and extra keys (the tenant's cache_salt and the LoRA adapter's id, in the
first block only; the chain carries them on):

    h0 = H(b"", tokens[0:16], salt + lora)    h1 = H(h0, tokens[16:32])    h2 = H(h1, ...) ...

so a prefix computed under one adapter (whose K and V differ from the base model's wherever
it targets k_proj or v_proj, and downstream of any layer it targets) is never reused by another
adapter or by the base model.

Equal hashes therefore mean equal whole prefixes. A new request takes over the longest run of
cached blocks that matches its prompt (by reference count, no copy) and computes only the rest;
at least its last prompt token is always computed so that the step produces logits.

Forks (parallel sampling, beam search) share every block of the parent by reference count. Full
blocks are never written again, so sharing them is free; the last, partly filled block is copied
on write: a sequence that appends to a partial block others still share gets a private copy of
it (the last owner left writes in place). `allocate_slots` returns that copy, `(src, dst)`; the
scheduler hands it to the runner in `SchedulerOutput.block_copies`, and the runner makes it
before the step's forward pass. The manager keeps no copies for later: every copy it causes is
in the return value of the call that caused it.

Swapping (preemption_mode="swap"): a preempted request's table moves to host memory, block by
block, and comes back when it resumes, so it keeps its computed tokens:

    device table   [b3  b8  b5  b9]        b3, b8: full, cached, still used by another request
    swapped        [h=- h=- h0  h1]  + the hash of each full block
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pagedllm.core.block_pool import BlockPool, KVCacheBlock
from pagedllm.core.request import Request
from pagedllm.core.step_io import BlockCopy
from pagedllm.utils import cdiv


def hash_block(parent: bytes | None, token_ids: list[int], extra: bytes = b"") -> bytes:
    digest = hashlib.sha256(parent or b"")
    digest.update(array("q", token_ids).tobytes())
    digest.update(extra)
    return digest.digest()


def first_block_keys(request: Request) -> bytes:
    """The extra keys of a request's first block: its cache salt, then its LoRA adapter's id
    after a 0xFF byte, which UTF-8 text never holds, so no salt can pass for an adapter."""
    salt = request.cache_salt.encode() if request.cache_salt else b""
    if not request.lora_int_id:
        return salt
    return salt + b"\xfflora" + request.lora_int_id.to_bytes(8, "little")


@dataclass(slots=True)
class SwappedBlock:
    """One entry of a swapped-out block table."""

    host: KVCacheBlock | None  # its copy in the host pool; None if it was left on the device
    block_hash: bytes | None  # to find it on the device again (prefix cache), if it is full


@dataclass(slots=True)
class RequestBlocks:
    """All the manager keeps for one request, in one record, so that fork, swap and free move
    it as a whole. Resident: `blocks` is its table and `swapped` is None; swapped out: `blocks`
    is empty and `swapped` holds the table."""

    blocks: list[KVCacheBlock] = field(default_factory=list)  # the block table on the device
    block_ids: list[int] = field(default_factory=list)  # the same table as plain ints
    # Chained hash of each full block of its tokens so far (computed or not), extended as the
    # tokens grow; kept across a swap, which needs them to find blocks again.
    hashes: list[bytes] = field(default_factory=list)
    # Blocks [0, num_registered) were offered to the prefix cache (pool.cache_block). The first
    # block with a given hash wins, so the cache may find another block with equal content.
    num_registered: int = 0
    swapped: list[SwappedBlock] | None = None  # the table in host memory while swapped out


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, host_pool: BlockPool | None = None) -> None:
        self.pool = pool
        self.block_size = block_size
        self.host_pool = host_pool  # swap space; None when preemption recomputes
        self._requests: dict[str, RequestBlocks] = {}  # by request id, until it is freed
        # Since start-up. The hit rate is KVCacheStats.prefix_cache_hit_rate, from these two.
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0
        self.num_cow_copies = 0  # shared partial blocks copied on write

    @property
    def caching(self) -> bool:
        return self.pool.enable_caching

    def _entry(self, request_id: str) -> RequestBlocks:
        entry = self._requests.get(request_id)
        if entry is None:
            entry = self._requests[request_id] = RequestBlocks()
        return entry

    def block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table as ints: the caller may keep it across steps."""
        entry = self._requests.get(request_id)
        return list(entry.block_ids) if entry else []

    def blocks(self, request_id: str) -> list[KVCacheBlock]:
        """A copy of the request's block table."""
        entry = self._requests.get(request_id)
        return list(entry.blocks) if entry else []

    # ---- prefix cache -------------------------------------------------------------------------
    def block_hashes(self, request: Request) -> list[bytes]:
        """Hashes of the request's full blocks, extended as its tokens grow."""
        hashes = self._entry(request.request_id).hashes
        bs = self.block_size
        while len(hashes) < request.num_tokens // bs:
            index = len(hashes)
            extra = first_block_keys(request) if index == 0 else b""
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
        if request.pooling_params is not None:
            return []  # pooling needs every token's hidden state (and an encoder caches no KV)
        limit = (request.num_tokens - 1) // self.block_size  # leave the last token to compute
        hits = []
        for block_hash in self.block_hashes(request)[:limit]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    # ---- allocation ---------------------------------------------------------------------------
    def num_blocks_needed(self, request: Request, num_new_tokens: int,
                          computed: Sequence[KVCacheBlock] = ()) -> int:
        tokens = request.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        entry = self._requests.get(request.request_id)
        have = (len(entry.blocks) if entry else 0) + len(computed)
        return max(0, cdiv(tokens, self.block_size) - have) + self._needs_copy(request)

    def _needs_copy(self, request: Request) -> bool:
        """Will the next token land in a partly filled block that another sequence shares?"""
        entry = self._requests.get(request.request_id)
        return entry is not None and bool(entry.blocks) \
            and request.num_computed_tokens % self.block_size != 0 \
            and entry.blocks[-1].ref_cnt > 1

    def _copy_on_write(self, entry: RequestBlocks) -> BlockCopy:
        """Give the request its own copy of its shared last block; returns (src, dst)."""
        shared = entry.blocks[-1]
        (private,) = self.pool.allocate(1)
        self.pool.free([shared])
        entry.blocks[-1] = private
        entry.block_ids[-1] = private.block_id
        self.num_cow_copies += 1
        return shared.block_id, private.block_id

    def fork(self, parent: Request, child: Request) -> None:
        """Give `child` the parent's whole block table, shared by reference count."""
        source = self._requests.get(parent.request_id) or RequestBlocks()
        self.pool.share(source.blocks)
        self._requests[child.request_id] = RequestBlocks(
            list(source.blocks), list(source.block_ids), list(source.hashes),
            source.num_registered)

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed: Sequence[KVCacheBlock] = ()) -> list[BlockCopy] | None:
        """Make room for `num_new_tokens` more tokens after the request's computed ones (and
        after `computed`, cached blocks it takes over). Returns the copy-on-write copies this
        made, (src, dst), which the runner must make before the forward pass (usually none); or
        None, with no change at all, if there are not enough free blocks."""
        needed = self.num_blocks_needed(request, num_new_tokens, computed)
        reclaimed = sum(1 for block in computed if block.ref_cnt == 0)  # leave the free queue
        if needed > self.pool.num_free_blocks - reclaimed:
            return None
        entry = self._entry(request.request_id)
        copies = []
        if self._needs_copy(request):
            copies.append(self._copy_on_write(entry))
            needed -= 1
        if computed:
            self.pool.share(computed)
            self._extend(entry, computed)
        if request.num_computed_tokens == 0 and self.caching:
            self.num_queried_tokens += request.num_tokens
            self.num_hit_tokens += len(computed) * self.block_size
        self._extend(entry, self.pool.allocate(needed))
        self._register_full_blocks(request, entry,
                                   len(computed) * self.block_size + num_new_tokens)
        return copies

    @staticmethod
    def _extend(entry: RequestBlocks, blocks: Sequence[KVCacheBlock]) -> None:
        entry.blocks.extend(blocks)
        entry.block_ids.extend(block.block_id for block in blocks)

    def _register_full_blocks(self, request: Request, entry: RequestBlocks,
                              num_new_tokens: int) -> None:
        """Offer the blocks this step fills to the prefix cache. K/V of all of a step's tokens
        are written before attention reads them, so a request admitted in the same step may
        already share them."""
        if not self.caching:
            return
        full = min(request.num_computed_tokens + num_new_tokens, request.num_tokens) // self.block_size
        if full <= entry.num_registered:
            return
        hashes = self.block_hashes(request)
        for index in range(entry.num_registered, full):
            self.pool.cache_block(entry.blocks[index], hashes[index])
        entry.num_registered = full

    def trim(self, request: Request) -> None:
        """Free the blocks past the request's computed tokens (speculative decoding: the blocks
        allocated only for drafts that were rejected). None of them was offered to the prefix
        cache: blocks are registered only up to the request's real tokens, all computed."""
        entry = self._requests.get(request.request_id)
        if entry is None:
            return
        keep = cdiv(request.num_computed_tokens, self.block_size)
        if len(entry.blocks) <= keep:
            return
        assert entry.num_registered <= keep, "a rolled-back block was in the prefix cache"
        self.pool.free(reversed(entry.blocks[keep:]))
        del entry.blocks[keep:], entry.block_ids[keep:]

    def free(self, request: Request) -> None:
        """Give back everything the request holds, on the device and on the host; a request the
        manager does not know is a no-op."""
        entry = self._requests.pop(request.request_id, None)
        if entry is None:
            return
        self._drop_swapped(entry)
        # Freed back to front: a request's tail blocks (least likely shared) are evicted first.
        self.pool.free(reversed(entry.blocks))

    def num_empty_slots(self, requests: Iterable[Request]) -> int:
        """Allocated slots that hold no token yet: the unfilled end of each request's table
        (internal fragmentation). A last block shared by forks is counted once."""
        seen: set[int] = set()
        empty = 0
        for request in requests:
            entry = self._requests.get(request.request_id)
            if entry is None or not entry.blocks or entry.blocks[-1].block_id in seen:
                continue
            seen.add(entry.blocks[-1].block_id)
            empty += max(0, len(entry.blocks) * self.block_size - request.num_computed_tokens)
        return empty

    # ---- swapping -----------------------------------------------------------------------------
    def is_swapped(self, request_id: str) -> bool:
        entry = self._requests.get(request_id)
        return entry is not None and entry.swapped is not None

    @property
    def num_swapped_requests(self) -> int:
        return sum(1 for entry in self._requests.values() if entry.swapped is not None)

    def host_blocks(self, request_id: str) -> list[KVCacheBlock]:
        """The host-pool blocks a swapped-out request holds."""
        entry = self._requests.get(request_id)
        swapped = entry.swapped if entry and entry.swapped else []
        return [s.host for s in swapped if s.host is not None]

    def _stays_on_device(self, block: KVCacheBlock) -> bool:
        """A cached block another request still uses needs no copy: it stays resident for that
        owner, and its hash finds it again on resume."""
        return block.ref_cnt > 1 and block.block_hash is not None

    def swap_out(self, request: Request) -> list[BlockCopy] | None:
        """Move the request's blocks to the host pool; returns the copies to make, (device id,
        host id), or None (nothing changed) if the host pool is too full."""
        entry = self._entry(request.request_id)
        to_copy = [block for block in entry.blocks if not self._stays_on_device(block)]
        if self.host_pool is None or len(to_copy) > self.host_pool.num_free_blocks:
            return None
        host_blocks = iter(self.host_pool.allocate(len(to_copy)))
        swapped, copies = [], []
        for block in entry.blocks:
            host = None if self._stays_on_device(block) else next(host_blocks)
            swapped.append(SwappedBlock(host, block.block_hash))
            if host is not None:
                copies.append((block.block_id, host.block_id))
        self.pool.free(reversed(entry.blocks))
        entry.blocks, entry.block_ids, entry.swapped = [], [], swapped
        return copies

    def _find_on_device(self, swapped: list[SwappedBlock]) -> list[KVCacheBlock | None]:
        return [self.pool.lookup(s.block_hash) if s.block_hash is not None else None
                for s in swapped]

    def swap_lost(self, request: Request) -> bool:
        """Was a block it left on the device evicted since? Then it can only be recomputed."""
        swapped = self._requests[request.request_id].swapped
        found = self._find_on_device(swapped)
        return any(s.host is None and f is None for s, f in zip(swapped, found))

    def swap_in(self, request: Request,
                num_new_tokens: int) -> tuple[list[BlockCopy], list[BlockCopy]] | None:
        """Bring a swapped request's table back and make room for `num_new_tokens` more tokens.
        Returns the copies to make, in this order: from the host, (host id, device id); then
        copy-on-write, (src, dst), from growing the table (none today: see the NOTE). None, with
        no change, if short of device blocks. Call only when `swap_lost` is False."""
        entry = self._requests[request.request_id]
        swapped = entry.swapped
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
        for swapped_block, block in zip(swapped, found):
            if block is None:
                block = next(fresh)
                copies.append((swapped_block.host.block_id, block.block_id))
            table.append(block)
        self._drop_swapped(entry)
        self._extend(entry, table)
        self._recache(request, entry)
        # NOTE: `needed` counted the blocks for the new tokens, so this cannot fail. A partly
        # filled last block has no hash, so it always comes back as a private copy and growing
        # the table copies nothing on write; its copies are returned all the same.
        on_write = self.allocate_slots(request, num_new_tokens)
        if on_write is None:
            raise AssertionError(f"no room for {request.request_id!r} after its swap-in")
        return copies, on_write

    def _recache(self, request: Request, entry: RequestBlocks) -> None:
        """Make the blocks copied back in findable again (they came back without a hash)."""
        if not self.caching:
            return
        hashes = self.block_hashes(request)
        for index in range(min(entry.num_registered, len(entry.blocks))):
            self.pool.cache_block(entry.blocks[index], hashes[index])

    def _drop_swapped(self, entry: RequestBlocks) -> None:
        """Give back the host blocks of a swapped-out table (a no-op when resident)."""
        if entry.swapped:
            self.host_pool.free(s.host for s in entry.swapped if s.host is not None)
        entry.swapped = None
