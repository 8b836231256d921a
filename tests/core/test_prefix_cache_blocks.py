"""Prefix caching in the block pool and KV-cache manager, driven without a model."""

from __future__ import annotations

from pagedllm.config import SchedulerConfig
from pagedllm.core.block_pool import BlockPool
from pagedllm.core.kv_cache_manager import KVCacheManager, hash_block
from pagedllm.core.request import Request
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.step_io import ModelRunnerOutput
from pagedllm.sampling_params import SamplingParams

BS = 4


def request(request_id, tokens, salt=None, max_tokens=4):
    return Request(request_id, list(tokens), SamplingParams(ignore_eos=True), max_tokens,
                   cache_salt=salt)


def admit(manager, req):
    """What the scheduler does on admission: take the cached run, allocate the rest."""
    cached = manager.get_computed_blocks(req)
    hit = len(cached) * BS
    assert manager.allocate_slots(req, req.num_tokens - hit, cached) is not None
    req.num_computed_tokens = req.num_tokens
    return hit


def test_hashes_chain_through_the_parent():
    a = hash_block(None, [1, 2, 3, 4])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(hash_block(None, [9, 9, 9, 9]), [5, 6, 7, 8])
    assert hash_block(None, [1, 2, 3, 4], b"salt") != a


def test_second_request_reuses_the_shared_prefix():
    pool = BlockPool(16)
    manager = KVCacheManager(pool, BS)
    first = request("a", range(10))  # 2 full blocks + 2 tokens
    assert admit(manager, first) == 0
    second = request("b", list(range(8)) + [50, 51, 52])
    assert admit(manager, second) == 8
    assert manager.blocks("b")[:2] == manager.blocks("a")[:2]
    assert all(b.ref_cnt == 2 for b in manager.blocks("a")[:2])
    assert manager.num_hit_tokens == 8 and manager.num_queried_tokens == 21


def test_last_token_is_always_computed():
    manager = KVCacheManager(BlockPool(8), BS)
    admit(manager, request("a", range(8)))
    same = request("b", range(8))  # identical prompt of exactly 2 blocks
    assert len(manager.get_computed_blocks(same)) == 1  # the second block holds the last token


def test_freed_blocks_stay_findable_until_reused():
    pool = BlockPool(4)
    manager = KVCacheManager(pool, BS)
    first = request("a", range(8))
    admit(manager, first)
    manager.free(first)
    assert pool.num_free_blocks == 4
    again = request("b", list(range(8)) + [99])
    assert admit(manager, again) == 8
    manager.free(again)
    # fill the whole pool with other tokens: the cached blocks are evicted, LRU first
    other = request("c", range(100, 116))
    admit(manager, other)
    assert pool.num_evictions >= 2 and not pool.cached.keys() & set(manager.block_hashes(again))
    assert manager.get_computed_blocks(request("d", list(range(8)) + [1])) == []


def test_different_salts_never_share():
    manager = KVCacheManager(BlockPool(16), BS)
    admit(manager, request("a", range(12), salt="tenant-1"))
    assert admit(manager, request("b", range(12), salt="tenant-2")) == 0
    assert admit(manager, request("c", range(12), salt="tenant-1")) == 8
    assert admit(manager, request("d", range(12))) == 0


def test_caching_off_shares_nothing():
    manager = KVCacheManager(BlockPool(16, enable_caching=False), BS)
    admit(manager, request("a", range(12)))
    assert admit(manager, request("b", range(12))) == 0


def test_allocation_counts_reclaimed_free_blocks():
    pool = BlockPool(3)
    manager = KVCacheManager(pool, BS)
    first = request("a", range(8))
    admit(manager, first)
    manager.free(first)  # 2 cached blocks now sit in the free queue
    longer = request("b", range(13))  # hits 2 blocks, needs 2 more; only 1 other is free
    cached = manager.get_computed_blocks(longer)
    assert len(cached) == 2
    assert manager.allocate_slots(longer, 5, cached) is None
    assert pool.num_free_blocks == 3 and all(b.ref_cnt == 0 for b in pool.blocks)


def test_scheduler_computes_only_the_suffix():
    pool = BlockPool(64)
    scheduler = Scheduler(SchedulerConfig(8, 64, 256), KVCacheManager(pool, BS))
    system = list(range(100, 120))  # 5 blocks of shared prefix
    scheduler.add_request(request("a", system + [1, 2], max_tokens=1))
    out = scheduler.schedule()
    scheduler.update_from_output(out, ModelRunnerOutput(["a"], [7]))
    scheduler.add_request(request("b", system + [3, 4, 5], max_tokens=1))
    out = scheduler.schedule()
    (item,) = out.scheduled
    assert item.start_position == 20 and item.token_ids == [3, 4, 5]
    scheduler.update_from_output(out, ModelRunnerOutput(["b"], [7]))
    assert pool.num_free_blocks == pool.num_blocks
