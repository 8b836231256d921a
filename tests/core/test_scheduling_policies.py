"""Priority scheduling, the long-prefill cap, and the waiting queues, without a model."""

from __future__ import annotations

import zlib

import pytest
from kv_content import ContentRunner, reference_output

from pagedllm.config import EngineArgs, SchedulerConfig
from pagedllm.core.block_pool import BlockPool
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request
from pagedllm.core.request_queue import FCFSQueue, PriorityQueue
from pagedllm.core.scheduler import Scheduler
from pagedllm.sampling_params import SamplingParams

BS = 4


def request(request_id, prompt_len, max_tokens=4, priority=0, arrival=0.0, base=None):
    # distinct prompts: no prefix-cache hits between them
    base = zlib.crc32(request_id.encode()) % 5000 if base is None else base
    return Request(request_id, list(range(base, base + prompt_len)),
                   SamplingParams(ignore_eos=True), max_tokens, arrival_time=arrival,
                   priority=priority)


def make_scheduler(num_blocks=64, budget=64, max_num_seqs=8, policy="fcfs", threshold=0):
    config = SchedulerConfig(max_num_seqs, budget, 512, threshold, "recompute", policy)
    pool = BlockPool(num_blocks)
    return Scheduler(config, KVCacheManager(pool, BS)), ContentRunner(num_blocks, 0, BS)


def step(scheduler, runner):
    out = scheduler.schedule()
    scheduler.update_from_output(out, runner.execute(out))
    return out


def run(scheduler, runner):
    """Steps until idle; returns {request id: the step it finished in}."""
    finished_at, number = {}, 0
    while scheduler.has_unfinished_requests():
        number += 1
        out = scheduler.schedule()
        before = set(scheduler.requests)
        scheduler.update_from_output(out, runner.execute(out))
        for request_id in before - set(scheduler.requests):
            finished_at[request_id] = number
    return finished_at


def test_priority_queue_orders_by_priority_then_arrival():
    queue = PriorityQueue()
    for rid, priority, arrival in [("a", 1, 0.0), ("b", 0, 2.0), ("c", 0, 1.0), ("d", 1, 0.0)]:
        queue.add(request(rid, 1, priority=priority, arrival=arrival))
    assert queue.peek().request_id == "c"
    assert [queue.pop().request_id for _ in range(len(queue))] == ["c", "b", "a", "d"]
    assert not queue


def test_fcfs_queue_puts_preempted_requests_first_and_removes_from_the_middle():
    queue = FCFSQueue()
    a, b, c = (request(rid, 1) for rid in "abc")
    queue.add(a)
    queue.add(b)
    queue.add_preempted(c)
    queue.remove(a)
    assert [queue.pop() for _ in range(len(queue))] == [c, b]


def test_high_priority_request_behind_many_low_ones_finishes_first():
    scheduler, runner = make_scheduler(max_num_seqs=2, policy="priority")
    for i in range(6):
        scheduler.add_request(request(f"low{i}", 6, max_tokens=6, priority=5, arrival=i))
    scheduler.add_request(request("high", 6, max_tokens=6, priority=0, arrival=10))
    finished_at = run(scheduler, runner)
    assert finished_at["high"] == min(finished_at.values())
    assert sum(1 for t in finished_at.values() if t > finished_at["high"]) >= 4


def test_fcfs_ignores_priority():
    scheduler, runner = make_scheduler(max_num_seqs=2, policy="fcfs")
    for i in range(6):
        scheduler.add_request(request(f"low{i}", 6, max_tokens=6, priority=5, arrival=i))
    scheduler.add_request(request("high", 6, max_tokens=6, priority=0, arrival=10))
    finished_at = run(scheduler, runner)
    assert finished_at["high"] == max(finished_at.values())


def test_priority_preemption_takes_the_lowest_priority_latest_arrival():
    # 4 requests of 6 prompt + 10 output tokens = 4 blocks each; 10 blocks hold two of them.
    scheduler, runner = make_scheduler(num_blocks=10, policy="priority")
    specs = [("a", 1, 0.0), ("b", 2, 1.0), ("c", 2, 2.0), ("d", 0, 3.0)]
    requests = {rid: request(rid, 6, max_tokens=10, priority=p, arrival=t)
                for rid, p, t in specs}
    for r in requests.values():
        scheduler.add_request(r)
    preempted = []
    while scheduler.has_unfinished_requests():
        preempted += step(scheduler, runner).preempted_request_ids
    assert preempted[0] == "c"  # priority 2 (the lowest) and the later of the two
    assert requests["d"].num_preemptions == 0  # the most urgent one is never the victim
    for r in requests.values():
        assert r.output_token_ids == reference_output(r.prompt_token_ids, 10)


def test_running_list_is_kept_in_priority_order():
    scheduler, runner = make_scheduler(policy="priority")
    for rid, priority in [("x", 3), ("y", 1), ("z", 2)]:
        scheduler.add_request(request(rid, 4, max_tokens=4, priority=priority))
    step(scheduler, runner)
    assert [r.request_id for r in scheduler.running] == ["y", "z", "x"]


def test_long_prefill_threshold_caps_each_requests_chunk():
    scheduler, runner = make_scheduler(budget=64, threshold=8)
    scheduler.add_request(request("long", 30, max_tokens=3))
    scheduler.add_request(request("short", 5, max_tokens=3))
    out = step(scheduler, runner)
    assert {s.request_id: len(s.token_ids) for s in out.scheduled} == {"long": 8, "short": 5}
    out = step(scheduler, runner)
    # the long prompt's next chunk shares the step with the short one's decode
    assert {s.request_id: len(s.token_ids) for s in out.scheduled} == {"long": 8, "short": 1}
    assert out.num_decode_tokens == 1 and out.num_prefill_tokens == 8


def test_a_long_prompt_never_takes_the_decodes_budget():
    # Under priority the urgent long prompt runs ahead of the decodes in the running list.
    scheduler, runner = make_scheduler(budget=10, policy="priority")
    for i in range(3):
        scheduler.add_request(request(f"d{i}", 2, max_tokens=20, priority=5))
    step(scheduler, runner)
    scheduler.add_request(request("urgent", 40, max_tokens=2, priority=0))
    step(scheduler, runner)  # admitted behind the decodes
    for _ in range(3):
        out = step(scheduler, runner)
        chunks = {s.request_id: len(s.token_ids) for s in out.scheduled}
        assert chunks == {"urgent": 7, "d0": 1, "d1": 1, "d2": 1}


def test_engine_args_check_the_new_options():
    with pytest.raises(ValueError, match="preemption_mode"):
        EngineArgs(preemption_mode="drop")
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineArgs(scheduling_policy="lifo")
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        EngineArgs(long_prefill_token_threshold=-1)
    with pytest.raises(ValueError, match="swap_space"):
        EngineArgs(swap_space=-1)
