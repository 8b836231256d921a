"""The scheduler driven by a fake model (every sampled token is 7): pure Python, no torch."""

from __future__ import annotations

import zlib

from pagedllm.config import SchedulerConfig
from pagedllm.core.block_pool import BlockPool
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.step_io import ModelRunnerOutput
from pagedllm.sampling_params import SamplingParams


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, max_len=256):
    pool = BlockPool(num_blocks)
    config = SchedulerConfig(max_num_seqs, budget, max_len)
    return Scheduler(config, KVCacheManager(pool, block_size)), pool


def add(scheduler, request_id, prompt_len, max_tokens, tokens=None):
    # distinct prompts unless given: equal ones would share blocks through the prefix cache
    tokens = tokens or [zlib.crc32(request_id.encode()) % 10_000 + i for i in range(prompt_len)]
    request = Request(request_id, tokens, SamplingParams(ignore_eos=True), max_tokens)
    scheduler.add_request(request)
    return request


def step(scheduler):
    out = scheduler.schedule()
    sampled = [s.request_id for s in out.scheduled if s.sample]
    finished = scheduler.update_from_output(out, ModelRunnerOutput(sampled, [7] * len(sampled)))
    return out, finished


def run_to_completion(scheduler, max_steps=10_000):
    steps = []
    while scheduler.has_unfinished_requests() and len(steps) < max_steps:
        steps.append(step(scheduler)[0])
    return steps


def test_budget_is_shared_and_prompts_are_chunked():
    scheduler, _ = make_scheduler(budget=10)
    add(scheduler, "a", 25, 2)
    out = scheduler.schedule()
    assert [(s.request_id, len(s.token_ids), s.sample) for s in out.scheduled] == [("a", 10, False)]
    assert out.num_scheduled_tokens == 10


def test_running_decodes_come_first_and_new_requests_join_next_step():
    scheduler, _ = make_scheduler(budget=16)
    add(scheduler, "a", 8, 5)
    step(scheduler)  # a: whole prompt
    add(scheduler, "b", 20, 5)
    out, _ = step(scheduler)
    assert [(s.request_id, len(s.token_ids)) for s in out.scheduled] == [("a", 1), ("b", 15)]


def test_finished_request_leaves_at_once_and_frees_its_blocks():
    scheduler, pool = make_scheduler()
    add(scheduler, "a", 4, 1)
    _, outputs = step(scheduler)
    assert outputs[0].finish_reason == "length"
    assert not scheduler.has_unfinished_requests()
    assert pool.num_free_blocks == pool.num_blocks
    assert scheduler.schedule().finished_request_ids == {"a"}


def test_max_num_seqs_caps_the_running_set():
    scheduler, _ = make_scheduler(max_num_seqs=2)
    for i in range(4):
        add(scheduler, f"r{i}", 4, 3)
    out, _ = step(scheduler)
    assert len(out.scheduled) == 2
    assert scheduler.num_waiting == 2


def test_continuous_batching_admits_while_others_run():
    scheduler, pool = make_scheduler(max_num_seqs=3, budget=64)
    lengths = [40, 2, 2, 2, 2, 2, 30, 2]
    for i, n in enumerate(lengths):
        add(scheduler, f"r{i}", 5, n)
    steps = run_to_completion(scheduler)
    assert len(steps) < sum(lengths) / 2
    # some step both decodes an earlier request and prefills a newly admitted one
    mixed = [s for s in steps if s.num_decode_tokens and s.num_prefill_tokens]
    assert mixed
    assert pool.num_free_blocks == pool.num_blocks


def test_preemption_frees_the_newest_and_everything_still_completes():
    scheduler, pool = make_scheduler(num_blocks=8, block_size=4, budget=64)
    requests = [add(scheduler, f"r{i}", 6, 10) for i in range(4)]  # 16 tokens = 4 blocks each
    steps = run_to_completion(scheduler)
    preempted = [rid for s in steps for rid in s.preempted_request_ids]
    assert preempted, "a cache of 8 blocks cannot hold 4 requests of 4 blocks"
    assert preempted[0] == "r3"  # all four fit at first; the newest is the first to go
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in requests)
    assert all(r.output_token_ids == [7] * 10 for r in requests)
    assert pool.num_free_blocks == pool.num_blocks


def test_preempted_request_is_recomputed_with_its_generated_tokens():
    scheduler, _ = make_scheduler(num_blocks=5, block_size=4, budget=64)
    a = add(scheduler, "a", 6, 10)
    b = add(scheduler, "b", 6, 10)
    while not b.num_preemptions:
        step(scheduler)
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    generated = list(b.output_token_ids)
    run_to_completion(scheduler)
    assert b.output_token_ids[: len(generated)] == generated
    assert a.num_preemptions == 0


def test_abort_waiting_and_running_requests():
    scheduler, pool = make_scheduler(max_num_seqs=1)
    add(scheduler, "a", 6, 10)
    add(scheduler, "b", 6, 10)
    step(scheduler)
    scheduler.finish_requests(["a", "b", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert not scheduler.has_unfinished_requests()
    assert pool.num_free_blocks == pool.num_blocks


def test_duplicate_request_id_is_rejected():
    scheduler, _ = make_scheduler()
    add(scheduler, "a", 4, 2)
    try:
        add(scheduler, "a", 4, 2)
    except ValueError as exc:
        assert "already in use" in str(exc)
    else:
        raise AssertionError("duplicate id accepted")


def test_scheduler_output_does_not_change_after_it_is_returned():
    """SchedulerOutput's contract: the core's later work (appended tokens, a grown block table,
    the next steps, an abort) leaves an output already returned as it was."""
    scheduler, _ = make_scheduler(block_size=4)
    request = add(scheduler, "a", 4, 10)
    first, _ = step(scheduler)  # the prompt fills block 0 and samples one token
    (row,) = first.scheduled
    frozen = (list(row.token_ids), list(row.block_ids), list(row.output_token_ids),
              list(row.prompt_token_ids), list(row.sample_ids))
    assert request.output_token_ids == [7] and row.output_token_ids == []
    step(scheduler)  # a decode into a second block
    request.prompt_token_ids.append(123)  # whoever holds the request changes it
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert (row.token_ids, row.block_ids, row.output_token_ids, row.prompt_token_ids,
            row.sample_ids) == frozen
    assert len(frozen[1]) == 1


def test_copy_on_write_of_a_fork_reaches_the_scheduler_output():
    scheduler, _ = make_scheduler(block_size=4)
    parent = add(scheduler, "a", 6, 10)  # its last block is partly filled
    step(scheduler)  # prompt
    child = scheduler.fork_request(parent, "a-1")
    out, _ = step(scheduler)  # both append into the block they share
    assert len(out.block_copies) == 1
    src, dst = out.block_copies[0]
    rows = {s.request_id: s.block_ids for s in out.scheduled}
    assert rows["a"][-1] == dst and rows["a-1"][-1] == src  # the last owner writes in place
    assert scheduler.kv.num_cow_copies == 1 and child.num_computed_tokens == 7


def test_requests_by_id_without_reaching_into_the_scheduler():
    scheduler, _ = make_scheduler(block_size=4)
    add(scheduler, "a", 4, 1)
    add(scheduler, "b", 4, 5)
    assert scheduler.is_unfinished("a") and scheduler.unfinished_ids() == ["a", "b"]
    scheduler.set_waiting_for_grammar("b", True)  # held back until its grammar compiles
    out, _ = step(scheduler)  # a: prompt and its only token
    assert [s.request_id for s in out.scheduled] == ["a"]
    assert not scheduler.is_unfinished("a") and scheduler.num_unfinished == 1
    scheduler.set_waiting_for_grammar("a", False)  # finished meanwhile: ignored
    scheduler.set_waiting_for_grammar("b", False)
    step(scheduler)
    scheduler.fork("b", "b-1")
    assert scheduler.unfinished_ids() == ["b", "b-1"]
    assert scheduler.kv.block_ids("b-1") == scheduler.kv.block_ids("b")
