"""AsyncLLM with its engine core in a process of its own (engine_core_process=True): the same
outputs as the offline engine, the same request life cycle, and a clear death if it dies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from pagedllm import RequestOutputKind, SamplingParams, StructuredOutputsParams
from pagedllm.config import EngineArgs
from pagedllm.engine.async_llm import AsyncLLM, EngineDeadError, NewRequest

PROMPTS = ["The capital of France is", "Hello, my name is", "One, two, three,"]


def greedy(max_tokens: int, kind=RequestOutputKind.DELTA, **extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, output_kind=kind, **extra)


def start(**extra) -> AsyncLLM:
    return AsyncLLM.from_engine_args(EngineArgs(kv_cache_memory_bytes=128 << 20,
                                                engine_core_process=True, **extra))


@pytest.fixture(scope="module")
def proc_llm():
    engine = start()
    yield engine
    engine.shutdown()
    assert not engine.engine.engine_core.process.is_alive()


async def collect(engine: AsyncLLM, requests: list[NewRequest]) -> dict[str, list]:
    outputs: dict[str, list] = {r.request_id: [] for r in requests}
    async for output in await engine.add_requests(requests):
        outputs[output.request_id].append(output)
    return outputs


def wait_until_all_blocks_free(engine: AsyncLLM, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats
        if stats.num_free_blocks == stats.num_blocks and not stats.num_running:
            return
        time.sleep(0.02)
    pytest.fail(f"blocks still in use: {engine.stats}")


def test_core_runs_in_another_process(proc_llm):
    core = proc_llm.engine.engine_core
    assert core.pid != os.getpid() and core.process.is_alive()


def test_outputs_match_the_offline_engine(proc_llm, offline_llm):
    expected = offline_llm.generate(PROMPTS, greedy(10, RequestOutputKind.FINAL_ONLY),
                                    use_tqdm=False)
    requests = [NewRequest(f"r{i}", p, greedy(10)) for i, p in enumerate(PROMPTS)]
    outputs = asyncio.run(collect(proc_llm, requests))
    texts = ["".join(o.outputs[0].text for o in outputs[f"r{i}"]) for i in range(3)]
    assert texts == [e.outputs[0].text for e in expected]
    assert proc_llm.stats.max_batch_size == 3
    wait_until_all_blocks_free(proc_llm)


def test_stop_strings_n_and_grammars_end_cleanly(proc_llm, offline_llm):
    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"]}
    # a stop string from the middle of the model's own greedy text, so it is sure to come
    full = offline_llm.generate(PROMPTS[:1], greedy(30, RequestOutputKind.FINAL_ONLY),
                                use_tqdm=False)[0].outputs[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    params = [
        greedy(30, stop=[stop]),
        SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=6,
                       output_kind=RequestOutputKind.FINAL_ONLY),
        greedy(40, structured_outputs=StructuredOutputsParams(json=schema),
               kind=RequestOutputKind.FINAL_ONLY),
    ]
    requests = [NewRequest(f"s{i}", p, sp) for i, (p, sp) in enumerate(zip(PROMPTS, params))]
    outputs = asyncio.run(collect(proc_llm, requests))
    stopped = "".join(o.outputs[0].text for o in outputs["s0"])
    assert stopped == full[: full.index(stop)]
    assert outputs["s0"][-1].outputs[0].finish_reason == "stop"
    assert len(outputs["s1"][-1].outputs) == 2
    assert list(json.loads(outputs["s2"][-1].outputs[0].text)) == ["city"]
    wait_until_all_blocks_free(proc_llm)


def test_bad_requests_fail_in_the_front_end(proc_llm):
    bad = greedy(5, structured_outputs=StructuredOutputsParams(regex="(unclosed"))
    with pytest.raises(ValueError, match="regex"):
        asyncio.run(collect(proc_llm, [NewRequest("bad", PROMPTS[0], bad)]))
    with pytest.raises(ValueError, match="max_model_len|KV cache"):
        asyncio.run(collect(proc_llm, [NewRequest("long", PROMPTS[0], greedy(10**7))]))
    assert proc_llm.is_running


def test_abort_mid_stream_frees_everything(proc_llm):
    async def run() -> str | None:
        stream = await proc_llm.add_requests(
            [NewRequest("long", PROMPTS[0], greedy(500, ignore_eos=True))])
        async for output in stream:
            if len(output.outputs[0].token_ids):
                stream.abort()
                break
        return None

    asyncio.run(run())
    wait_until_all_blocks_free(proc_llm)


def test_killed_core_process_is_a_clear_death():
    engine = start()
    pid = engine.engine.engine_core.pid

    async def run() -> float:
        stream = await engine.add_requests(
            [NewRequest("r", PROMPTS[0], greedy(2000, ignore_eos=True))])
        killed_at = None
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                if killed_at is None:
                    killed_at = time.monotonic()
                    os.kill(pid, signal.SIGKILL)
        return time.monotonic() - killed_at

    assert asyncio.run(run()) < 5
    deadline = time.monotonic() + 5
    while engine.is_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.is_running
    with pytest.raises(EngineDeadError):
        asyncio.run(collect(engine, [NewRequest("after", PROMPTS[0], greedy(3))]))
    with pytest.raises(EngineDeadError):  # the dashboard's snapshot too: no wait for nothing
        asyncio.run(asyncio.wait_for(engine.snapshot(), 10))
    engine.shutdown()


def test_the_dashboard_snapshot_crosses_the_process_boundary(proc_llm):
    """Snapshots (core/snapshot.py) come back through the pipe between steps, each answering
    its own request, while the core keeps stepping."""
    from pagedllm.core.snapshot import CACHED, FREE, USED

    async def run() -> list:
        stream = await proc_llm.add_requests(
            [NewRequest("watched", PROMPTS[0], greedy(500, ignore_eos=True))])
        async for output in stream:
            if output.outputs[0].token_ids:
                snapshots = await asyncio.gather(*(proc_llm.snapshot() for _ in range(3)))
                stream.abort()
                return snapshots
        return []

    snapshots = asyncio.run(run())
    assert len(snapshots) == 3
    assert [s.num_steps for s in snapshots] == sorted(s.num_steps for s in snapshots)
    for snapshot in snapshots:
        (view,) = snapshot.requests
        assert (view.request_id, view.state) == ("watched", "running")
        assert view.num_output_tokens >= 1 and view.block_ids
        assert {snapshot.block_states[b] for b in view.block_ids} == {USED}
        kv = snapshot.kv_cache
        free = snapshot.block_states.count(FREE) + snapshot.block_states.count(CACHED)
        assert kv.num_free_blocks == free == kv.num_blocks - len(view.block_ids)
    wait_until_all_blocks_free(proc_llm)
