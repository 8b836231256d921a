"""Steps in flight (pipeline parallelism keeps one per stage): a request whose step has not come
back is neither scheduled again nor preempted; once its output is in, it runs on."""

from __future__ import annotations

from pagedllm.config import SchedulerConfig
from pagedllm.core.block_pool import BlockPool
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.step_io import ModelRunnerOutput
from pagedllm.sampling_params import SamplingParams

BLOCK = 4


def scheduler_with(num_blocks: int, budget: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(8, budget, 256), KVCacheManager(BlockPool(num_blocks), BLOCK))


def add(scheduler: Scheduler, request_id: str, prompt_len: int, max_tokens: int = 4) -> None:
    tokens = [hash(request_id) % 100 + i + 1 for i in range(prompt_len)]
    scheduler.add_request(Request(request_id, tokens, SamplingParams(ignore_eos=True),
                                  max_tokens))


def returned(scheduler: Scheduler, out) -> None:
    sampled = [s.request_id for s in out.scheduled if s.sample]
    scheduler.update_from_output(out, ModelRunnerOutput(sampled, [7] * len(sampled)))


def ids(out) -> list[str]:
    return [s.request_id for s in out.scheduled]


def test_a_request_in_flight_waits_for_its_output():
    scheduler = scheduler_with(64)
    add(scheduler, "a", 5)
    first = scheduler.schedule()
    add(scheduler, "b", 5)
    second = scheduler.schedule()  # "a" still in flight: only the newcomer
    assert ids(first) == ["a"] and ids(second) == ["b"]
    assert not scheduler.schedule().scheduled  # both in flight
    returned(scheduler, first)
    third = scheduler.schedule()
    assert ids(third) == ["a"] and third.scheduled[0].is_decode
    returned(scheduler, second)
    returned(scheduler, third)
    assert scheduler.in_flight == set()


def test_preemption_passes_over_requests_in_flight():
    """Memory runs out while "a" is in flight: the request being scheduled gives way (it is the
    last one not in flight), never "a", whose step is still computing into its blocks."""
    scheduler = scheduler_with(4, budget=16)  # 4 blocks of 4 tokens
    add(scheduler, "a", 8)
    a_step = scheduler.schedule()  # a's prompt: 2 blocks, in flight from here on
    add(scheduler, "b", 8)
    b_step = scheduler.schedule()  # b's prompt: the other 2 blocks
    assert ids(a_step) == ["a"] and ids(b_step) == ["b"]
    returned(scheduler, b_step)  # b's first token: its next one needs a third block
    step = scheduler.schedule()
    assert step.preempted_request_ids == ["b"] and not step.scheduled
    assert [r.request_id for r in scheduler.running] == ["a"]
    returned(scheduler, a_step)
    assert ids(scheduler.schedule()) == ["a"]
