"""The dashboard's snapshot of the block pool and the queues (core/snapshot.py), taken from a
real scheduler driven by a fake model: pure Python, no torch."""

from __future__ import annotations

from kv_content import ContentRunner
from test_scheduler import add, make_scheduler, run_to_completion, step
from test_swap import make_scheduler as make_swap_scheduler
from test_swap import request as swap_request

from pagedllm.core.snapshot import CACHED, FREE, HASH_PREFIX_BYTES, HIT, SHARED, USED, take_snapshot


def snapshot(scheduler):
    return take_snapshot(scheduler, num_steps=0, num_prompt_tokens=0, num_output_tokens=0)


def states_of(snap, block_ids):
    return [snap.block_states[b] for b in block_ids]


def test_a_running_request_owns_used_blocks_and_the_rest_are_free():
    scheduler, pool = make_scheduler(num_blocks=32)
    add(scheduler, "a", 10, 4)
    add(scheduler, "late", 6, 4)
    scheduler.config.max_num_seqs = 1  # "late" stays waiting
    step(scheduler)
    snap = snapshot(scheduler)
    a, late = snap.requests
    assert (a.request_id, a.state, a.num_prompt_tokens, a.num_computed_tokens,
            a.num_output_tokens) == ("a", "running", 10, 10, 1)
    assert (late.request_id, late.state, late.block_ids) == ("late", "waiting", [])
    assert len(a.block_ids) == 3 and states_of(snap, a.block_ids) == [USED] * 3
    assert sorted(set(snap.block_states)) == [FREE, USED]
    assert snap.block_states.count(USED) == pool.num_blocks - pool.num_free_blocks
    assert (snap.num_running, snap.num_waiting) == (1, 1)
    assert len(snap.block_hashes) == HASH_PREFIX_BYTES * pool.num_blocks
    for index, block_id in enumerate(a.block_ids):  # the two full blocks carry their hash
        block = pool.blocks[block_id]
        prefix = snap.block_hashes[block_id * HASH_PREFIX_BYTES:(block_id + 1) * HASH_PREFIX_BYTES]
        assert (prefix != bytes(HASH_PREFIX_BYTES)) == (index < 2)
        assert block.block_hash is None or prefix == block.block_hash[:HASH_PREFIX_BYTES]


def test_finished_blocks_stay_cached_and_prefix_hits_show_as_hit_then_shared():
    scheduler, pool = make_scheduler(num_blocks=32)
    prompt = list(range(100, 113))  # 13 tokens: 3 full blocks
    add(scheduler, "first", len(prompt), 2, tokens=prompt)
    run_to_completion(scheduler)
    snap = snapshot(scheduler)
    assert snap.requests == []
    assert snap.block_states.count(CACHED) == len(pool.cached) >= 3
    assert set(snap.block_states) == {FREE, CACHED}

    add(scheduler, "hit", len(prompt), 8, tokens=prompt)
    step(scheduler)
    snap = snapshot(scheduler)
    (hit,) = snap.requests
    assert hit.num_cached_tokens == 12
    assert states_of(snap, hit.block_ids) == [HIT, HIT, HIT, USED]

    add(scheduler, "again", len(prompt), 8, tokens=prompt)  # the same prefix, running together
    step(scheduler)
    snap = snapshot(scheduler)
    again = next(r for r in snap.requests if r.request_id == "again")
    assert again.block_ids[:3] == hit.block_ids[:3]
    assert states_of(snap, again.block_ids[:3]) == [SHARED] * 3
    in_use = pool.num_blocks - pool.num_free_blocks
    assert sum(snap.block_states.count(s) for s in (USED, HIT, SHARED)) == in_use


def test_snapshot_counts_match_the_schedulers_kv_cache_stats():
    scheduler, _ = make_scheduler(num_blocks=16, budget=64)
    for i in range(5):
        add(scheduler, f"r{i}", 9, 30)
    for _ in range(6):
        step(scheduler)
    snap = snapshot(scheduler)
    kv = snap.kv_cache
    free = snap.block_states.count(FREE) + snap.block_states.count(CACHED)
    assert free == kv.num_free_blocks
    assert snap.num_running + snap.num_waiting == 5
    assert {r.state for r in snap.requests} <= {"running", "waiting", "preempted"}


def test_preempted_and_swapped_requests_are_named_so_and_hold_no_device_block():
    for mode, expected in (("swap", "swapped"), ("recompute", "preempted")):
        scheduler, pool, _ = make_swap_scheduler(num_blocks=5, num_host_blocks=8, mode=mode)
        runner = ContentRunner(5, 8, 4)
        for name, start in (("a", 0), ("b", 50)):
            scheduler.add_request(swap_request(name, range(start, start + 6), max_tokens=10))
        views = {}
        for _ in range(50):  # until one of them is pushed out
            out = scheduler.schedule()
            scheduler.update_from_output(out, runner.execute(out))
            views = {v.request_id: v for v in snapshot(scheduler).requests}
            if any(v.state == expected for v in views.values()):
                break
        pushed = [v for v in views.values() if v.state == expected]
        assert len(pushed) == 1 and pushed[0].block_ids == [], (mode, views)
        assert pushed[0].num_computed_tokens == (pushed[0].num_prompt_tokens
                                                 + pushed[0].num_output_tokens - 1
                                                 if mode == "swap" else 0)
        snap = snapshot(scheduler)
        assert snap.kv_cache.num_swapped_requests == (mode == "swap")
        in_use = sum(snap.block_states.count(s) for s in (USED, HIT, SHARED))
        assert in_use == pool.num_blocks - pool.num_free_blocks
