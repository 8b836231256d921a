"""A model-based stateful test (hypothesis) of the block pool under the KV-cache manager.

The machine keeps its own reference of both pools in plain lists (`PoolModel`): each block's
owner count, the free queue in order, each block's hash and the hash -> block map, plus every
request's block table (device) or swapped table (host). Each rule drives the real
KVCacheManager the way the scheduler does (admit with prefix-cache hits, grow by chunks and
decodes, fork, finish, preempt to recompute, swap out, swap in, flood the pool so that cached
free blocks are evicted), first predicting from the model what must happen: which blocks are
hits, which blocks a request gets, which copies are made on write or to and from the host, and
whether the call fails for lack of room. After every rule the invariants compare the real pools
with the model and with the requests' tokens:

    ref_cnt == number of live tables holding the block    (device and host)
    free queue == the blocks nobody holds, each once, in the model's order
    num_free + num_in_use == num_blocks
    cached[h].block_hash == h, every hashed block is cached[its hash], and that hash is the
        chained hash of the tokens its holders have at that position
    a block in two tables: at the same position in both, holding the same tokens

Tokens come from a three-letter alphabet behind a few shared prefixes, so hits, forks that
decode the same token (the prefix cache's "first block wins") and evictions are all common.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedllm.core.block_pool import BlockPool
from pagedllm.core.kv_cache_manager import KVCacheManager, hash_block
from pagedllm.core.request import Request
from pagedllm.sampling_params import SamplingParams
from pagedllm.utils import cdiv

BS = 4
NUM_BLOCKS = 10
NUM_HOST_BLOCKS = 12
# Few live requests at a time, so that they also finish, get swapped in and free room.
MAX_LIVE = 5
ALPHABET = st.integers(0, 2)
PREFIXES = [[], [0, 1, 2, 0], [0, 1, 2, 0, 1, 2, 0, 1], [0, 1, 2, 0, 2, 2, 2, 2], [1] * 8]
# Hypothesis runs up to STEPS rules per example (about 30 on average here), so this is about
# 10^4 rules in all (measured: 9,900 to 10,400), each followed by every invariant: 10-20 s on 2 cores.
STEPS = 50
EXAMPLES = 250

Copies = list[tuple[int, int]]


def chain_hashes(request: Request) -> list[bytes]:
    """The hash each full block of the request must carry: its tokens chained from the parent
    block's hash, the salt in the first block only (the contract in kv_cache_manager.py)."""
    hashes: list[bytes] = []
    tokens = request.all_token_ids
    for index in range(len(tokens) // BS):
        salt = request.cache_salt.encode() if index == 0 and request.cache_salt else b""
        hashes.append(hash_block(hashes[-1] if hashes else None,
                                 tokens[index * BS:(index + 1) * BS], salt))
    return hashes


class PoolModel:
    """What a BlockPool must look like, kept in plain lists by the rules of its docstring:
    allocate takes the front of the free queue and evicts its hash, free appends the blocks
    nobody holds any more, share pulls them out again, the first block with a hash wins."""

    def __init__(self, num_blocks: int, caching: bool) -> None:
        self.owners = [0] * num_blocks
        self.free = list(range(num_blocks))  # the free queue, front (next to reuse) first
        self.hash: list[bytes | None] = [None] * num_blocks
        self.cache: dict[bytes, int] = {}
        self.caching = caching
        self.evictions = 0

    def allocate(self, count: int) -> list[int]:
        taken, self.free = self.free[:count], self.free[count:]
        for block_id in taken:
            self._evict(block_id)
            self.owners[block_id] = 1
        return taken

    def _evict(self, block_id: int) -> None:
        block_hash = self.hash[block_id]
        if block_hash is not None:
            if self.cache.get(block_hash) == block_id:
                del self.cache[block_hash]
            self.hash[block_id] = None
            self.evictions += 1

    def share(self, block_ids: Iterable[int]) -> None:
        for block_id in block_ids:
            if self.owners[block_id] == 0:
                self.free.remove(block_id)
            self.owners[block_id] += 1

    def release(self, block_ids: Iterable[int]) -> None:
        for block_id in block_ids:
            assert self.owners[block_id] > 0, f"the model frees block {block_id} twice"
            self.owners[block_id] -= 1
            if self.owners[block_id] == 0:
                self.free.append(block_id)

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        if self.caching and self.hash[block_id] is None and block_hash not in self.cache:
            self.hash[block_id] = block_hash
            self.cache[block_hash] = block_id

    def stays_on_device(self, block_id: int) -> bool:
        """Swap-out leaves a cached block that someone else holds on the device."""
        return self.owners[block_id] > 1 and self.hash[block_id] is not None


def check_pool(pool: BlockPool, model: PoolModel, tables: Iterable[list[int]]) -> None:
    """The real pool against the model and against the tables that hold its blocks."""
    held = Counter(block_id for table in tables for block_id in table)
    for block in pool.blocks:
        assert block.ref_cnt == held[block.block_id] == model.owners[block.block_id], block
        # Only a queued block is linked into the queue: a stale link would corrupt it later.
        assert (block.prev_free is None) == (block.ref_cnt > 0), block
    queued = [block.block_id for block in pool.free_queue]
    assert queued == model.free  # order too: least recently freed is evicted first
    assert len(set(queued)) == len(queued) == pool.num_free_blocks
    assert set(queued) == {b.block_id for b in pool.blocks if b.ref_cnt == 0}
    in_use = sum(1 for block in pool.blocks if block.ref_cnt > 0)
    assert pool.num_free_blocks + in_use == pool.num_blocks
    assert pool.num_evictions == model.evictions


def check_hash_map(pool: BlockPool, model: PoolModel) -> None:
    """The hash -> block map points only at blocks carrying that hash, and reaches them all."""
    assert {h: block.block_id for h, block in pool.cached.items()} == model.cache
    for block_hash, block in pool.cached.items():
        assert block.block_hash == block_hash and pool.blocks[block.block_id] is block
    for block in pool.blocks:
        assert block.block_hash == model.hash[block.block_id], block
        assert block.block_hash is None or pool.cached[block.block_hash] is block, block


class BlockPoolStateMachine(RuleBasedStateMachine):
    """Requests on a small KVCacheManager (10 device blocks, 12 host blocks, 4 tokens a block),
    checked rule by rule against the model."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS)
        self.host = BlockPool(NUM_HOST_BLOCKS, enable_caching=False)
        self.kv = KVCacheManager(self.pool, BS, self.host)
        self.model = PoolModel(NUM_BLOCKS, caching=True)
        self.host_model = PoolModel(NUM_HOST_BLOCKS, caching=False)
        # Every live request is in exactly one of these three.
        self.waiting: dict[str, Request] = {}  # holds no block (not admitted, or preempted)
        self.resident: dict[str, Request] = {}
        self.swapped: dict[str, Request] = {}
        self.tables: dict[str, list[int]] = {}  # resident: the device block table
        # Swapped: per block, its host block (None: left on the device) and its device hash.
        self.host_tables: dict[str, list[int | None]] = {}
        self.swapped_hashes: dict[str, list[bytes | None]] = {}
        self.registered: dict[str, int] = {}  # blocks offered to the prefix cache so far
        self.count = 0

    # ---- helpers ------------------------------------------------------------------------------
    def _new_request(self, tokens: list[int], salt: str | None) -> Request:
        self.count += 1
        return Request(f"r{self.count}", tokens, SamplingParams(), 64, cache_salt=salt)

    @staticmethod
    def _pick(data: st.DataObject, requests: dict[str, Request]) -> Request:
        return requests[data.draw(st.sampled_from(sorted(requests)))]

    def _expected_hits(self, request: Request) -> list[int]:
        """The longest cached run of the prompt's full blocks, leaving the last token."""
        hits = []
        for block_hash in chain_hashes(request)[:(request.num_tokens - 1) // BS]:
            if block_hash not in self.model.cache:
                break
            hits.append(self.model.cache[block_hash])
        return hits

    def _expect_allocate(self, request: Request, num_new: int, hits: list[int]) -> Copies | None:
        """The model's allocate_slots: None if it cannot fit, else the copies made on write."""
        rid, computed = request.request_id, request.num_computed_tokens
        table = list(self.tables.get(rid, []))
        cow = bool(table) and computed % BS != 0 and self.model.owners[table[-1]] > 1
        tokens = computed + len(hits) * BS + num_new
        needed = max(0, cdiv(tokens, BS) - len(table) - len(hits))
        reclaimed = sum(1 for block_id in hits if self.model.owners[block_id] == 0)
        if needed + cow > len(self.model.free) - reclaimed:
            return None
        copies = []
        if cow:  # a shared partial block is about to be written: a private copy first
            (private,) = self.model.allocate(1)
            self.model.release([table[-1]])
            copies.append((table[-1], private))
            table[-1] = private
        self.model.share(hits)
        self.tables[rid] = table + hits + self.model.allocate(needed)
        self._expect_register(request, len(hits) * BS + num_new)
        return copies

    def _expect_register(self, request: Request, num_new: int) -> None:
        rid = request.request_id
        full = min(request.num_computed_tokens + num_new, request.num_tokens) // BS
        hashes = chain_hashes(request)
        for index in range(self.registered.get(rid, 0), full):
            self.model.cache_block(self.tables[rid][index], hashes[index])
        self.registered[rid] = max(full, self.registered.get(rid, 0))

    def _try_admit(self, request: Request, chunk: int) -> None:
        """Admission as the scheduler does it; a request that does not fit waits."""
        hits = self._expected_hits(request)
        cached = self.kv.get_computed_blocks(request)
        assert [block.block_id for block in cached] == hits
        num_new = min(request.num_tokens - len(hits) * BS, chunk)
        expected = self._expect_allocate(request, num_new, hits)
        assert self.kv.allocate_slots(request, num_new, cached) == expected
        self.waiting.pop(request.request_id, None)
        if expected is None:
            self.waiting[request.request_id] = request
            return
        request.num_computed_tokens = len(hits) * BS + num_new
        self.resident[request.request_id] = request

    def _forget(self, request: Request) -> None:
        """Drop the request from the model as KVCacheManager.free does: host blocks first (in
        table order), then the device table back to front."""
        rid = request.request_id
        self.host_model.release(h for h in self.host_tables.pop(rid, []) if h is not None)
        self.model.release(reversed(self.tables.pop(rid, [])))
        self.swapped_hashes.pop(rid, None)
        self.registered.pop(rid, None)
        for group in (self.waiting, self.resident, self.swapped):
            group.pop(rid, None)

    def _restart(self, request: Request) -> None:
        """Preemption by recompute: everything freed, back to the queue from token 0."""
        self._forget(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        self.waiting[request.request_id] = request

    def _room_for_one_more(self) -> bool:
        return len(self.waiting) + len(self.resident) + len(self.swapped) < MAX_LIVE

    # ---- rules --------------------------------------------------------------------------------
    @precondition(_room_for_one_more)
    @rule(prefix=st.sampled_from(PREFIXES), suffix=st.lists(ALPHABET, max_size=6),
          chunk=st.integers(1, 16), salt=st.sampled_from([None, None, "tenant"]))
    def admit(self, prefix: list[int], suffix: list[int], chunk: int, salt: str | None) -> None:
        self._try_admit(self._new_request(prefix + suffix or [0], salt), chunk)

    @precondition(lambda self: self.waiting)
    @rule(data=st.data(), chunk=st.integers(1, 16))
    def retry_waiting(self, data: st.DataObject, chunk: int) -> None:
        self._try_admit(self._pick(data, self.waiting), chunk)

    @precondition(lambda self: self.model.free and self._room_for_one_more())
    @rule(data=st.data())
    def flood(self, data: st.DataObject) -> None:
        """Memory pressure: a prompt of new tokens that takes the first `count` free blocks,
        evicting exactly the cached ones among them (least recently freed first)."""
        free = len(self.model.free)
        count = data.draw(st.one_of(st.just(free), st.integers(1, free)))  # often all of them
        tokens = [100 + self.count * 64 + i for i in range(count * BS)]
        evictions = self.pool.num_evictions
        cached = sum(1 for b in self.model.free[:count] if self.model.hash[b] is not None)
        self._try_admit(self._new_request(tokens, None), len(tokens))
        assert self.pool.num_evictions == evictions + cached

    @precondition(lambda self: self.resident)
    @rule(data=st.data(), chunk=st.integers(1, 8), token=ALPHABET)
    def grow(self, data: st.DataObject, chunk: int, token: int) -> None:
        """A chunk of the prompt, or a decode once the prompt is computed."""
        request = self._pick(data, self.resident)
        if request.num_computed_tokens == request.num_tokens:
            request.append_output_token(token)
        num_new = min(request.num_tokens - request.num_computed_tokens, chunk)
        expected = self._expect_allocate(request, num_new, [])
        assert self.kv.allocate_slots(request, num_new) == expected
        if expected is not None:
            request.num_computed_tokens += num_new

    @precondition(lambda self: self.resident and self._room_for_one_more())
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = self._pick(data, self.resident)
        self.count += 1
        child = parent.fork(f"r{self.count}")
        table = self.tables[parent.request_id]
        self.model.share(table)
        self.tables[child.request_id] = list(table)
        self.registered[child.request_id] = self.registered[parent.request_id]
        self.kv.fork(parent, child)
        self.resident[child.request_id] = child

    @precondition(lambda self: self.waiting or self.resident or self.swapped)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        request = self._pick(data, {**self.waiting, **self.resident, **self.swapped})
        self._forget(request)
        self.kv.free(request)

    @precondition(lambda self: self.resident)
    @rule(data=st.data())
    def preempt_to_recompute(self, data: st.DataObject) -> None:
        self._restart(self._pick(data, self.resident))

    @precondition(lambda self: self.resident)
    @rule(data=st.data())
    def swap_out(self, data: st.DataObject) -> None:
        request = self._pick(data, self.resident)
        expected = self._expect_swap_out(request.request_id)
        assert self.kv.swap_out(request) == expected
        if expected is not None:
            self.swapped[request.request_id] = self.resident.pop(request.request_id)

    def _expect_swap_out(self, rid: str) -> Copies | None:
        table = self.tables[rid]
        stays = [self.model.stays_on_device(block_id) for block_id in table]
        if stays.count(False) > len(self.host_model.free):
            return None
        hosts = iter(self.host_model.allocate(stays.count(False)))
        entries = [None if stay else next(hosts) for stay in stays]
        self.host_tables[rid] = entries
        self.swapped_hashes[rid] = [self.model.hash[block_id] for block_id in table]
        self.model.release(reversed(self.tables.pop(rid)))
        return [(d, h) for d, h in zip(table, entries) if h is not None]

    @precondition(lambda self: self.swapped)
    @rule(data=st.data(), chunk=st.integers(0, 8))
    def swap_in(self, data: st.DataObject, chunk: int) -> None:
        request = self._pick(data, self.swapped)
        rid = request.request_id
        found = [self.model.cache.get(h) if h else None for h in self.swapped_hashes[rid]]
        lost = any(h is None and f is None for h, f in zip(self.host_tables[rid], found))
        assert self.kv.swap_lost(request) == lost
        if lost:  # a block left on the device was evicted: only a recompute can bring it back
            self._restart(request)
            return
        num_new = min(request.num_tokens - request.num_computed_tokens, chunk)
        expected = self._expect_swap_in(request, found, num_new)
        assert self.kv.swap_in(request, num_new) == expected
        if expected is not None:
            request.num_computed_tokens += num_new
            self.resident[rid] = self.swapped.pop(rid)

    def _expect_swap_in(self, request: Request, found: list[int | None],
                        num_new: int) -> tuple[Copies, Copies] | None:
        rid = request.request_id
        entries = self.host_tables[rid]
        num_copies = found.count(None)
        reclaimed = sum(1 for f in found if f is not None and self.model.owners[f] == 0)
        tokens = request.num_computed_tokens + num_new
        needed = num_copies + max(0, cdiv(tokens, BS) - len(entries))
        if needed > len(self.model.free) - reclaimed:
            return None
        self.model.share(f for f in found if f is not None)  # before the allocation evicts
        fresh = iter(self.model.allocate(num_copies))
        table = [f if f is not None else next(fresh) for f in found]
        from_host = [(h, d) for h, d, f in zip(entries, table, found) if f is None]
        self.host_model.release(h for h in self.host_tables.pop(rid) if h is not None)
        del self.swapped_hashes[rid]
        self.tables[rid] = table
        hashes = chain_hashes(request)  # the blocks copied back in become findable again
        for index in range(min(self.registered[rid], len(table))):
            self.model.cache_block(table[index], hashes[index])
        on_write = self._expect_allocate(request, num_new, [])
        assert on_write is not None, "swap_in counted the room for its new tokens"
        return from_host, on_write

    # ---- invariants ---------------------------------------------------------------------------
    @invariant()
    def manager_holds_the_model_tables(self) -> None:
        for rid in self.resident:
            assert self.kv.block_ids(rid) == self.tables[rid]
            assert [b.block_id for b in self.kv.blocks(rid)] == self.tables[rid]
            assert not self.kv.is_swapped(rid)
        for rid, entries in self.host_tables.items():
            assert self.kv.is_swapped(rid) and self.kv.block_ids(rid) == []
            assert [b.block_id for b in self.kv.host_blocks(rid)] == [
                h for h in entries if h is not None]
        for rid in self.waiting:
            assert self.kv.block_ids(rid) == [] and not self.kv.is_swapped(rid)
        # A finished request leaves no record behind; a live one may (a waiting one's hashes).
        live = {*self.waiting, *self.resident, *self.swapped}
        assert {*self.resident, *self.swapped} <= set(self.kv._requests) <= live
        assert self.kv.num_swapped_requests == len(self.swapped)

    @invariant()
    def pools_match_the_model(self) -> None:
        check_pool(self.pool, self.model, self.tables.values())
        host_tables = [[h for h in entries if h is not None] for entries in self.host_tables.values()]
        check_pool(self.host, self.host_model, host_tables)
        # A host block is never shared: forks and prefix hits share device blocks only.
        assert all(n == 1 for n in Counter(h for t in host_tables for h in t).values())
        check_hash_map(self.pool, self.model)
        check_hash_map(self.host, self.host_model)
        assert not self.host.cached  # host blocks are never findable by content

    @invariant()
    def tables_fit_their_tokens(self) -> None:
        """Blocks are added only for computed tokens: at most one partly filled block each."""
        for rid, request in self.resident.items():
            assert len(self.tables[rid]) == cdiv(request.num_computed_tokens, BS), rid
        for rid, request in self.swapped.items():
            assert len(self.host_tables[rid]) == cdiv(request.num_computed_tokens, BS), rid

    @invariant()
    def hashed_blocks_hold_their_tokens(self) -> None:
        """A block's hash is the chained hash of what its holders computed in it."""
        for rid, request in self.resident.items():
            hashes = chain_hashes(request)
            for index, block_id in enumerate(self.tables[rid]):
                block_hash = self.pool.blocks[block_id].block_hash
                if block_hash is not None:
                    assert (index + 1) * BS <= request.num_computed_tokens, (rid, block_id)
                    assert block_hash == hashes[index], (rid, block_id)

    @invariant()
    def shared_blocks_are_shared_by_content(self) -> None:
        """A block in two tables came from a prefix hit or a fork: it sits at the same position
        in both and holds the same computed tokens (its ref count is checked above)."""
        first: dict[int, tuple[str, int]] = {}
        for rid, table in self.tables.items():
            for index, block_id in enumerate(table):
                other, other_index = first.setdefault(block_id, (rid, index))
                assert other_index == index, (block_id, rid, other)
                assert self._block_tokens(rid, index) == self._block_tokens(other, index), \
                    (block_id, rid, other)

    def _block_tokens(self, rid: str, index: int) -> list[int]:
        request = self.resident[rid]
        end = min((index + 1) * BS, request.num_computed_tokens)
        return request.all_token_ids[index * BS:end]

    def teardown(self) -> None:
        for request in [*self.waiting.values(), *self.resident.values(), *self.swapped.values()]:
            self.kv.free(request)
        assert not self.kv._requests
        assert self.pool.num_free_blocks == NUM_BLOCKS
        assert self.host.num_free_blocks == NUM_HOST_BLOCKS
        assert all(block.ref_cnt == 0 for block in [*self.pool.blocks, *self.host.blocks])


TestBlockPoolStateful = BlockPoolStateMachine.TestCase
TestBlockPoolStateful.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
