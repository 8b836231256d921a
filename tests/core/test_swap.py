"""Swap preemption in the KV-cache manager and the scheduler, without a model."""

from __future__ import annotations

from kv_content import ContentRunner, reference_output

from pagedllm.config import SchedulerConfig
from pagedllm.core.block_pool import BlockPool
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.sampling_params import SamplingParams

BS = 4


def request(request_id, tokens, max_tokens=8, priority=0):
    return Request(request_id, list(tokens), SamplingParams(ignore_eos=True), max_tokens,
                   priority=priority)


def computed(manager, req, num_new=None):
    """Admit or grow `req` as the scheduler would and mark the tokens computed."""
    cached = manager.get_computed_blocks(req)
    hit = len(cached) * BS
    num_new = req.num_tokens - req.num_computed_tokens - hit if num_new is None else num_new
    assert manager.allocate_slots(req, num_new, cached) is not None
    req.num_computed_tokens += hit + num_new


def test_swap_out_frees_device_blocks_and_keeps_progress():
    pool, host = BlockPool(8, enable_caching=False), BlockPool(8, enable_caching=False)
    manager = KVCacheManager(pool, BS, host)
    req = request("a", range(10))
    computed(manager, req)
    device_ids = manager.block_ids("a")
    copies = manager.swap_out(req)
    assert [d for d, _ in copies] == device_ids
    assert manager.is_swapped("a") and manager.block_ids("a") == []
    assert pool.num_free_blocks == 8 and host.num_free_blocks == 5
    assert req.num_computed_tokens == 10
    back, on_write = manager.swap_in(req, 1)
    assert on_write == []
    assert [h for h, _ in back] == [b.block_id for b in host.blocks[:3]]
    assert len(manager.block_ids("a")) == 3 and host.num_free_blocks == 8
    manager.free(req)
    assert pool.num_free_blocks == 8


def test_blocks_still_in_the_prefix_cache_come_back_without_a_copy():
    pool, host = BlockPool(8), BlockPool(8, enable_caching=False)
    manager = KVCacheManager(pool, BS, host)
    req = request("a", range(10))
    computed(manager, req)
    full = manager.blocks("a")[:2]
    assert len(manager.swap_out(req)) == 3  # copied out all the same: it might be evicted
    back, _ = manager.swap_in(req, 1)
    assert back == [(host.blocks[2].block_id, manager.block_ids("a")[2])]
    assert manager.blocks("a")[:2] == full and host.num_free_blocks == 8


def test_shared_cached_blocks_stay_on_the_device():
    pool, host = BlockPool(10), BlockPool(10, enable_caching=False)
    manager = KVCacheManager(pool, BS, host)
    first = request("a", list(range(8)) + [1, 2])
    second = request("b", list(range(8)) + [3, 4])
    computed(manager, first)
    computed(manager, second)
    shared = manager.blocks("b")[:2]
    assert shared == manager.blocks("a")[:2]
    copies = manager.swap_out(second)
    assert len(copies) == 1  # only its own last block is copied
    assert all(b.ref_cnt == 1 for b in shared)  # "a" still holds them
    assert manager.host_blocks("b") == [host.blocks[0]]
    assert not manager.swap_lost(second)
    back, _ = manager.swap_in(second, 1)
    assert len(back) == 1 and manager.blocks("b")[:2] == shared
    assert all(b.ref_cnt == 2 for b in shared)


def test_evicted_shared_block_means_recompute():
    pool, host = BlockPool(4), BlockPool(4, enable_caching=False)
    manager = KVCacheManager(pool, BS, host)
    first = request("a", list(range(4)) + [1])
    second = request("b", list(range(4)) + [2])
    computed(manager, first)
    computed(manager, second)
    manager.swap_out(second)
    manager.free(first)  # the shared block is now only cached...
    computed(manager, request("c", range(100, 116)))  # ...and this takes every block
    assert manager.swap_lost(second)
    manager.free(second)
    assert host.num_free_blocks == 4


def test_swap_out_fails_cleanly_when_the_host_pool_is_full():
    pool, host = BlockPool(8), BlockPool(2, enable_caching=False)
    manager = KVCacheManager(pool, BS, host)
    req = request("a", range(12))
    computed(manager, req)
    assert manager.swap_out(req) is None
    assert len(manager.block_ids("a")) == 3 and host.num_free_blocks == 2


def test_swap_in_waits_for_device_room():
    pool, host = BlockPool(4), BlockPool(4, enable_caching=False)
    manager = KVCacheManager(pool, BS, host)
    a = request("a", range(100, 112))
    computed(manager, a)
    manager.swap_out(a)
    b = request("b", range(200, 208))
    computed(manager, b)
    assert manager.swap_in(a, 1) is None  # needs 3 + 1 blocks, 2 are free
    assert manager.is_swapped("a") and pool.num_free_blocks == 2
    manager.free(b)
    assert manager.swap_in(a, 1) is not None


def make_scheduler(num_blocks, num_host_blocks, budget=64, max_num_seqs=8, mode="swap",
                   policy="fcfs", threshold=0):
    pool = BlockPool(num_blocks)
    host = BlockPool(num_host_blocks, enable_caching=False) if num_host_blocks else None
    config = SchedulerConfig(max_num_seqs, budget, 512, threshold, mode, policy)
    return Scheduler(config, KVCacheManager(pool, BS, host)), pool, host


def run(scheduler, runner, max_steps=5000):
    outs = []
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        scheduler.update_from_output(out, runner.execute(out))
        outs.append(out)
        assert len(outs) < max_steps
    return outs


def test_scheduler_swaps_out_and_back_in_with_the_same_tokens():
    scheduler, pool, host = make_scheduler(num_blocks=8, num_host_blocks=16)
    runner = ContentRunner(8, 16, BS)
    requests = [request(f"r{i}", range(10 * i, 10 * i + 6), max_tokens=10) for i in range(4)]
    for r in requests:
        scheduler.add_request(r)
    outs = run(scheduler, runner)
    assert scheduler.num_swap_outs > 0 and scheduler.num_swap_ins == scheduler.num_swap_outs
    assert any(o.blocks_to_swap_out for o in outs) and any(o.blocks_to_swap_in for o in outs)
    assert not any(o.blocks_to_swap_out and o.blocks_to_swap_in for o in outs)
    for r in requests:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, 10), r.request_id
    assert pool.num_free_blocks == 8 and host.num_free_blocks == 16


def test_swapped_request_resumes_without_recomputing():
    scheduler, _, _ = make_scheduler(num_blocks=5, num_host_blocks=8)
    runner = ContentRunner(5, 8, BS)
    a = request("a", range(6), max_tokens=10)
    b = request("b", range(50, 56), max_tokens=10)
    scheduler.add_request(a)
    scheduler.add_request(b)
    outs = []
    while not b.num_preemptions:
        out = scheduler.schedule()
        scheduler.update_from_output(out, runner.execute(out))
        outs.append(out)
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens > 0
    progress = b.num_computed_tokens
    outs += run(scheduler, runner)
    resumed = next(o for o in outs if o.blocks_to_swap_in)
    (item,) = [s for s in resumed.scheduled if s.request_id == "b"]
    assert item.start_position == progress and len(item.token_ids) == 1
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 10)


def test_full_host_pool_falls_back_to_recompute():
    scheduler, _, host = make_scheduler(num_blocks=8, num_host_blocks=1)
    runner = ContentRunner(8, 1, BS)
    requests = [request(f"r{i}", range(10 * i, 10 * i + 6), max_tokens=10) for i in range(4)]
    for r in requests:
        scheduler.add_request(r)
    run(scheduler, runner)
    assert scheduler.num_preemptions > scheduler.num_swap_outs
    for r in requests:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, 10)
    assert host.num_free_blocks == 1


def test_aborting_a_swapped_request_frees_its_host_blocks():
    scheduler, pool, host = make_scheduler(num_blocks=5, num_host_blocks=8)
    runner = ContentRunner(5, 8, BS)
    a = request("a", range(6), max_tokens=10)
    b = request("b", range(50, 56), max_tokens=10)
    scheduler.add_request(a)
    scheduler.add_request(b)
    while not b.num_preemptions:
        out = scheduler.schedule()
        scheduler.update_from_output(out, runner.execute(out))
    assert host.num_free_blocks < 8
    scheduler.finish_requests(["a", "b"], RequestStatus.FINISHED_ABORTED)
    assert host.num_free_blocks == 8 and pool.num_free_blocks == 5
    assert scheduler.kv_cache_stats().num_swapped_requests == 0
