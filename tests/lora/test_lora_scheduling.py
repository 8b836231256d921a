"""LoRA slots per step: never more than max_loras adapters in one step, nobody starves, and the
prefix cache never shares blocks across adapters."""

from __future__ import annotations

import pytest
from lora_models import ALL, lora, peft_reference, save_adapter, save_base
from tiny_models import tiny_engine, transformers_greedy

from pagedllm import SamplingParams, TokensPrompt
from pagedllm.config import SchedulerConfig
from pagedllm.core.block_pool import BlockPool
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.step_io import ModelRunnerOutput
from pagedllm.lora.request import LoRARequest
from pagedllm.sampling_params import SamplingParams as Params

NUM_ADAPTERS = 5


# ---- the scheduler alone (pure Python) ------------------------------------------------------------
def scheduler_with(max_loras: int, budget: int = 64) -> Scheduler:
    config = SchedulerConfig(8, budget, 256, max_loras=max_loras)
    return Scheduler(config, KVCacheManager(BlockPool(128), 4))


def queue(scheduler: Scheduler, request_id: str, lora_id: int, max_tokens: int = 3) -> None:
    adapter = LoRARequest(f"a{lora_id}", lora_id, "/unused") if lora_id else None
    tokens = [lora_id * 100 + i + 1 for i in range(6)]
    scheduler.add_request(Request(request_id, tokens, Params(ignore_eos=True), max_tokens,
                                  lora_request=adapter))


def run(scheduler: Scheduler) -> list[set[int]]:
    """Step with a fake model to the end; each step's set of adapter ids."""
    steps = []
    for _ in range(1000):
        if not scheduler.has_unfinished_requests():
            return steps
        out = scheduler.schedule()
        steps.append({s.lora_request.lora_int_id for s in out.scheduled if s.lora_request})
        fake_model_step(scheduler, out)
    raise AssertionError("the requests never finished")


def fake_model_step(scheduler: Scheduler, out) -> None:
    """Token 7 for every row that samples, handed back as the runner would."""
    sampled = [s.request_id for s in out.scheduled if s.sample]
    scheduler.update_from_output(out, ModelRunnerOutput(sampled, [7] * len(sampled)))


def test_a_step_never_holds_more_than_max_loras_adapters():
    scheduler = scheduler_with(max_loras=2)
    for i in range(12):  # adapters 1..5 and the base model, interleaved
        queue(scheduler, f"r{i}", i % 6, max_tokens=2 + i % 3)
    steps = run(scheduler)
    assert max(len(s) for s in steps) == 2
    assert set().union(*steps) == {1, 2, 3, 4, 5}
    assert scheduler.kv.pool.num_free_blocks == scheduler.kv.pool.num_blocks


def test_requests_behind_a_blocked_adapter_still_run():
    """With both slots taken, a third adapter waits, but base-model requests and requests
    under a running adapter behind it are admitted in the same step."""
    scheduler = scheduler_with(max_loras=2)
    for request_id, lora_id in (("a", 1), ("b", 2), ("c", 3), ("base", 0), ("a2", 1)):
        queue(scheduler, request_id, lora_id)
    first = scheduler.schedule()
    assert [s.request_id for s in first.scheduled] == ["a", "b", "base", "a2"]
    assert [r.request_id for r in scheduler.waiting] == ["c"]
    fake_model_step(scheduler, first)
    run(scheduler)  # c runs once a slot frees


def test_first_block_hash_keys_on_the_adapter():
    manager = KVCacheManager(BlockPool(16), 4)
    tokens = list(range(8))

    def hashes(request_id, lora_id, salt=None):
        adapter = LoRARequest("x", lora_id, "/unused") if lora_id else None
        request = Request(request_id, tokens, Params(), 1, cache_salt=salt, lora_request=adapter)
        return manager.block_hashes(request)

    base, one, one_again, two = hashes("b", 0), hashes("x", 1), hashes("y", 1), hashes("z", 2)
    assert one == one_again
    assert len({base[0], one[0], two[0]}) == 3 and len({base[1], one[1], two[1]}) == 3
    # a salt never passes for an adapter: salt bytes are UTF-8, the adapter key starts at 0xFF
    assert hashes("s", 0, salt="\x00lora") != one and hashes("t", 1, salt="k") != one


# ---- through the engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-sched")
    save_base("llama", root / "base")
    folders = []
    for i in range(1, NUM_ADAPTERS + 1):
        folders.append(root / f"a{i}")
        save_adapter(root / "base", folders[-1], 2 * i, 8, ALL, seed=10 + i)
    return root / "base", folders


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                          detokenize=False)


def test_more_adapters_than_slots_all_complete(adapters):
    """Five adapters through two slots and a host cache of two: every request completes with
    its adapter's tokens, no step holds more than two adapters, adapters are read again after
    an eviction, and (the autouse check) every block is free afterwards."""
    base, folders = adapters
    llm = tiny_engine(base, enable_lora=True, max_loras=2, max_cpu_loras=2, max_lora_rank=16,
                      max_num_batched_tokens=64)
    loras = [lora(f"a{i}", i, folder) for i, folder in enumerate(folders, 1)] * 2 + [None]
    prompt = list(range(5, 30))
    before = len(llm.llm_engine.step_records)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=prompt)] * len(loras), greedy(6),
                           use_tqdm=False, lora_request=loras)
    records = list(llm.llm_engine.step_records)[before:]
    assert max(len(r.loras) for r in records) == 2
    assert {name for r in records for name in r.loras} == {f"a{i}" for i in range(1, 6)}
    for output, request in zip(outputs, loras):
        folder = request.lora_path if request else None
        expected = transformers_greedy(peft_reference(base, folder), prompt, 6)
        assert output.outputs[0].token_ids == expected
    manager = llm.llm_engine.worker.lora_manager
    assert len(manager.loaded) == 2 and manager.num_loads >= NUM_ADAPTERS


def test_prefix_cache_never_crosses_adapters(adapters):
    """The same prompt under two adapters (and the base model): each gets its own output, and
    the prefix-cache hits count only the repeat under the same adapter."""
    base, folders = adapters
    llm = tiny_engine(base, enable_lora=True, max_loras=2, max_lora_rank=16)
    one, two = lora("p1", 21, folders[0]), lora("p2", 22, folders[1])
    prompt = [TokensPrompt(prompt_token_ids=list(range(40, 90)))]

    def run_under(request):
        hits = llm.llm_engine.kv_cache_stats().prefix_cache_hits
        tokens = llm.generate(prompt, greedy(4), use_tqdm=False,
                              lora_request=request)[0].outputs[0].token_ids
        return tokens, llm.llm_engine.kv_cache_stats().prefix_cache_hits - hits

    first, first_hits = run_under(one)
    second, second_hits = run_under(two)
    plain, plain_hits = run_under(None)
    again, again_hits = run_under(one)
    assert (first_hits, second_hits, plain_hits) == (0, 0, 0)
    assert again_hits == 48 and again == first  # three full 16-token blocks, found again
    assert len({tuple(first), tuple(second), tuple(plain)}) == 3
    for tokens, folder in ((first, folders[0]), (second, folders[1]), (plain, None)):
        assert tokens == transformers_greedy(peft_reference(base, folder), list(range(40, 90)), 4)


def test_running_and_waiting_adapters_are_reported(adapters):
    """With one slot, the first adapter runs and the second waits: the core's stats (and
    vLLM's lora_requests_info metric built from them) say so."""
    from pagedllm.engine.async_llm import EngineStats
    from pagedllm.entrypoints.openai.metrics import lora_requests_info

    base, folders = adapters
    llm = tiny_engine(base, enable_lora=True, max_loras=1, max_lora_rank=16)
    engine = llm.llm_engine
    prompt = TokensPrompt(prompt_token_ids=list(range(1, 9)))
    engine.add_request("x", prompt, greedy(3), lora_request=lora("first", 31, folders[0]))
    engine.add_request("y", prompt, greedy(3), lora_request=lora("second", 32, folders[1]))
    engine.step()
    stats = engine.engine_core.stats()
    assert (stats.running_loras, stats.waiting_loras) == (("first",), ("second",))
    while engine.has_unfinished_requests():
        engine.step()
    sample = lora_requests_info(EngineStats(max_loras=1, running_loras=stats.running_loras,
                                            waiting_loras=stats.waiting_loras,
                                            published_at=123.0)).samples[0]
    assert sample.labels == {"max_lora": "1", "running_lora_adapters": "first",
                             "waiting_lora_adapters": "second"}
    assert sample.value == 123.0
