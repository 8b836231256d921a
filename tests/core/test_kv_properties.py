"""Property-based tests (hypothesis) of the block pool, the KV-cache manager and the scheduler.

Random interleavings of allocate, grow, fork (copy-on-write), free, prefix-cache hits,
eviction, swap-out and swap-in must never double-free, never leak, and never give one block to
two owners unless it is shared by count; every owner must read back exactly its own tokens; and
when everything is freed every block is free (possibly still cached).
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)
from kv_content import ContentRunner, SlotContents, reference_output

from pagedllm.config import SchedulerConfig
from pagedllm.core.block_pool import BlockPool, KVCacheBlock
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request
from pagedllm.core.scheduler import Scheduler
from pagedllm.sampling_params import SamplingParams

BS = 4
NUM_BLOCKS = 12
NUM_HOST_BLOCKS = 6
# Prompts start with one of a few prefixes, so prefix-cache hits (and misses) are common.
PREFIXES = [[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [7] * 12]
tokens = st.lists(st.integers(0, 9), max_size=6)


def check_pool(pool: BlockPool, owners: list[list[KVCacheBlock]]) -> None:
    """Reference counts equal the owners' holdings; the free queue is exactly the unowned
    blocks, each once, with consistent links; the hash map points at blocks carrying it."""
    held = Counter(block.block_id for blocks in owners for block in blocks)
    for block in pool.blocks:
        assert block.ref_cnt == held[block.block_id], block
    queued = [block.block_id for block in pool.free_queue]
    assert len(queued) == len(set(queued)) == pool.num_free_blocks
    assert set(queued) == {b.block_id for b in pool.blocks if b.ref_cnt == 0}
    for block_hash, block in pool.cached.items():
        assert block.block_hash == block_hash
    assert all(pool.cached.get(b.block_hash) is b for b in pool.blocks if b.block_hash)


class BlockPoolMachine(RuleBasedStateMachine):
    """The pool alone: owners take, share and give back blocks; freed blocks are reused
    least recently freed first and keep their hash until then."""

    owners = Bundle("owners")

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(8)
        self.held: dict[int, list[KVCacheBlock]] = {}
        self.next_owner = 0

    def _own(self, blocks: list[KVCacheBlock]) -> int:
        self.next_owner += 1
        self.held[self.next_owner] = blocks
        return self.next_owner

    @rule(target=owners, count=st.integers(1, 4))
    def allocate(self, count):
        if count > self.pool.num_free_blocks:
            with pytest.raises(ValueError):
                self.pool.allocate(count)
            return self._own([])
        expected = list(self.pool.free_queue)[:count]
        blocks = self.pool.allocate(count)
        assert blocks == expected  # the front of the queue: least recently freed
        assert all(b.block_hash is None and b.ref_cnt == 1 for b in blocks)  # evicted
        return self._own(blocks)

    @rule(target=owners, owner=owners)
    def share(self, owner):
        blocks = list(self.held.get(owner, []))
        self.pool.share(blocks)
        return self._own(blocks)

    @precondition(lambda self: self.pool.num_free_blocks > 0)
    @rule(target=owners, data=st.data())
    def claim_free_block(self, data):
        """A prefix-cache hit on a block that sits in the free queue."""
        block = data.draw(st.sampled_from(list(self.pool.free_queue)))
        self.pool.share([block])
        return self._own([block])

    @rule(owner=owners, key=st.integers(0, 5))
    def cache(self, owner, key):
        for block in self.held.get(owner, []):
            self.pool.cache_block(block, bytes([key]))

    @rule(owner=consumes(owners))
    def free(self, owner):
        blocks = self.held.pop(owner, [])
        self.pool.free(blocks)
        released = [b for b in blocks if b.ref_cnt == 0]
        if released:
            tail = list(self.pool.free_queue)[-len(released):]
            assert tail == released  # to the back, in the order freed

    @precondition(lambda self: self.pool.num_free_blocks > 0)
    @rule(data=st.data())
    def double_free_is_refused(self, data):
        block = data.draw(st.sampled_from(list(self.pool.free_queue)))
        with pytest.raises(AssertionError, match="double free"):
            self.pool.free([block])

    @invariant()
    def consistent(self):
        check_pool(self.pool, list(self.held.values()))

    def teardown(self):
        for blocks in self.held.values():
            self.pool.free(blocks)
        check_pool(self.pool, [])
        assert self.pool.num_free_blocks == self.pool.num_blocks


class KVCacheManagerMachine(RuleBasedStateMachine):
    """Requests on the manager, with the slots' contents tracked: after every rule each
    resident request must read back its own tokens through its block table."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS)
        self.host = BlockPool(NUM_HOST_BLOCKS, enable_caching=False)
        self.kv = KVCacheManager(self.pool, BS, self.host)
        self.slots = SlotContents(NUM_BLOCKS, NUM_HOST_BLOCKS, BS)
        self.resident: dict[str, Request] = {}
        self.swapped: dict[str, Request] = {}
        self.count = 0

    def _new_id(self) -> str:
        self.count += 1
        return f"r{self.count}"

    def _compute(self, request: Request, num_new: int, copies: list[tuple[int, int]]) -> None:
        """The runner's part: the copy-on-write copies the allocation returned, then the new
        tokens' K/V."""
        self.slots.copy(copies)
        start = request.num_computed_tokens
        ids = self.kv.block_ids(request.request_id)
        self.slots.write(ids, start, request.all_token_ids[start:start + num_new])
        request.num_computed_tokens += num_new

    def _pick(self, data, requests: dict[str, Request]) -> Request:
        return requests[data.draw(st.sampled_from(sorted(requests)))]

    @rule(prefix=st.sampled_from(PREFIXES), suffix=tokens, chunk=st.integers(1, 16),
          salt=st.sampled_from([None, "tenant"]))
    def admit(self, prefix, suffix, chunk, salt):
        prompt = prefix + suffix or [0]
        request = Request(self._new_id(), prompt, SamplingParams(), 8, cache_salt=salt)
        cached = self.kv.get_computed_blocks(request)
        hit = len(cached) * BS
        num_new = min(request.num_tokens - hit, chunk)
        free_before = self.pool.num_free_blocks
        copies = self.kv.allocate_slots(request, num_new, cached)
        if copies is None:
            assert self.pool.num_free_blocks == free_before
            assert self.kv.block_ids(request.request_id) == []
            return
        request.num_computed_tokens = hit
        self._compute(request, num_new, copies)
        self.resident[request.request_id] = request

    @precondition(lambda self: self.resident)
    @rule(data=st.data(), chunk=st.integers(1, 8), token=st.integers(0, 9))
    def grow(self, data, chunk, token):
        request = self._pick(data, self.resident)
        if request.num_computed_tokens == request.num_tokens:
            request.append_output_token(token)  # a decode
        num_new = min(request.num_tokens - request.num_computed_tokens, chunk)
        copies = self.kv.allocate_slots(request, num_new)
        if copies is not None:
            self._compute(request, num_new, copies)

    @precondition(lambda self: self.resident)
    @rule(data=st.data())
    def fork(self, data):
        parent = self._pick(data, self.resident)
        child = parent.fork(self._new_id())
        self.kv.fork(parent, child)
        self.resident[child.request_id] = child

    @precondition(lambda self: self.resident or self.swapped)
    @rule(data=st.data())
    def free(self, data):
        request = self._pick(data, {**self.resident, **self.swapped})
        self.kv.free(request)
        self.resident.pop(request.request_id, None)
        self.swapped.pop(request.request_id, None)

    @precondition(lambda self: self.resident)
    @rule(data=st.data())
    def swap_out(self, data):
        request = self._pick(data, self.resident)
        table = self.kv.block_ids(request.request_id)
        copies = self.kv.swap_out(request)
        if copies is None:  # host pool full: nothing changed
            assert self.kv.block_ids(request.request_id) == table
            return
        self.slots.swap_out(copies)
        self.swapped[request.request_id] = self.resident.pop(request.request_id)

    @precondition(lambda self: self.swapped)
    @rule(data=st.data(), chunk=st.integers(0, 8))
    def swap_in(self, data, chunk):
        request = self._pick(data, self.swapped)
        if self.kv.swap_lost(request):
            self.kv.free(request)  # the scheduler would recompute it from scratch
            del self.swapped[request.request_id]
            return
        num_new = min(request.num_tokens - request.num_computed_tokens, chunk)
        copies = self.kv.swap_in(request, num_new)
        if copies is None:
            assert self.kv.is_swapped(request.request_id)
            return
        from_host, on_write = copies
        self.slots.swap_in(from_host)
        self._compute(request, num_new, on_write)
        self.resident[request.request_id] = self.swapped.pop(request.request_id)

    @invariant()
    def blocks_are_owned_by_count(self):
        check_pool(self.pool, [self.kv.blocks(rid) for rid in self.resident])
        check_pool(self.host, [self.kv.host_blocks(rid) for rid in self.swapped])
        assert all(self.kv.is_swapped(rid) for rid in self.swapped)
        assert not any(self.kv.is_swapped(rid) for rid in self.resident)

    @invariant()
    def every_request_reads_its_own_tokens(self):
        for request in self.resident.values():
            n = request.num_computed_tokens
            ids = self.kv.block_ids(request.request_id)
            assert self.slots.read(ids, n) == request.all_token_ids[:n], request.request_id

    def teardown(self):
        for request in [*self.resident.values(), *self.swapped.values()]:
            self.kv.free(request)
        check_pool(self.pool, [])
        check_pool(self.host, [])
        assert self.pool.num_free_blocks == NUM_BLOCKS
        assert self.host.num_free_blocks == NUM_HOST_BLOCKS


STATEFUL = settings(max_examples=150, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
TestBlockPool = BlockPoolMachine.TestCase
TestBlockPool.settings = STATEFUL
TestKVCacheManager = KVCacheManagerMachine.TestCase
TestKVCacheManager.settings = STATEFUL


@st.composite
def workloads(draw):
    """A cache configuration and requests that arrive over the first steps."""
    num_blocks = draw(st.integers(4, 16))
    config = {
        "num_blocks": num_blocks,
        "num_host_blocks": draw(st.integers(1, 12)),
        "budget": draw(st.integers(2, 24)),
        "max_num_seqs": draw(st.integers(1, 6)),
        "threshold": draw(st.sampled_from([0, 1, 3, 8])),
        "mode": draw(st.sampled_from(["recompute", "swap"])),
        "policy": draw(st.sampled_from(["fcfs", "priority"])),
        "caching": draw(st.booleans()),
    }
    requests = []
    for _ in range(draw(st.integers(1, 8))):
        prompt = draw(st.sampled_from(PREFIXES)) + draw(tokens) or [5]
        room = num_blocks * BS - len(prompt)  # what the engine would accept
        if room < 1:
            continue
        requests.append((prompt, draw(st.integers(1, min(room, 12))), draw(st.integers(0, 3)),
                         draw(st.integers(0, 6))))  # + priority, arrival step
    return config, requests


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_any_load_completes_with_the_tokens_of_unlimited_memory(workload):
    config, specs = workload
    pool = BlockPool(config["num_blocks"], config["caching"])
    host = BlockPool(config["num_host_blocks"], enable_caching=False)
    scheduler = Scheduler(
        SchedulerConfig(config["max_num_seqs"], config["budget"], 1024, config["threshold"],
                        config["mode"], config["policy"]),
        KVCacheManager(pool, BS, host))
    runner = ContentRunner(config["num_blocks"], config["num_host_blocks"], BS)
    requests = [Request(f"r{i}", prompt, SamplingParams(ignore_eos=True), max_tokens,
                        arrival_time=float(arrival), priority=priority)
                for i, (prompt, max_tokens, priority, arrival) in enumerate(specs)]
    step = 0
    while step < 2000 and (scheduler.has_unfinished_requests()
                           or any(r.arrival_time >= step for r in requests)):
        for r in requests:
            if r.arrival_time == step:
                scheduler.add_request(r)
        out = scheduler.schedule()
        assert out.num_scheduled_tokens <= config["budget"]
        if config["threshold"]:
            assert all(len(s.token_ids) <= config["threshold"] for s in out.scheduled)
        scheduler.update_from_output(out, runner.execute(out))
        check_pool(pool, [scheduler.kv.blocks(r.request_id) for r in scheduler.running])
        step += 1
    assert not scheduler.has_unfinished_requests(), "the load never drained"
    for r in requests:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.max_tokens)
    assert pool.num_free_blocks == pool.num_blocks
    assert host.num_free_blocks == host.num_blocks
