"""AsyncLLM around the session's offline engine: batching, validation, aborts, idling, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pagedllm import RequestOutputKind, SamplingParams
from pagedllm.engine.async_llm import (
    MAX_STEP_FAILURES,
    AsyncLLM,
    EngineDeadError,
    EngineOverloadedError,
    EngineStepError,
    NewRequest,
    RequestStats,
)

PROMPTS = ["The capital of France is", "Hello, my name is", "One, two, three,"]


@pytest.fixture
def async_llm(offline_llm):
    engine = AsyncLLM(offline_llm.llm_engine)
    yield engine
    engine.shutdown()
    assert not engine._thread.is_alive()
    assert not offline_llm.llm_engine.has_unfinished_requests()


def greedy(max_tokens: int, kind=RequestOutputKind.DELTA, **extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, output_kind=kind, **extra)


async def engine_is_clean(async_llm: AsyncLLM) -> bool:
    """Asked on the engine thread: no request left and every KV block free."""
    def check(engine) -> bool:
        pool = engine.engine_core.block_pool
        return not engine.has_unfinished_requests() and pool.num_free_blocks == pool.num_blocks
    return await async_llm.call(check)


def test_streamed_deltas_match_offline_and_run_in_one_batch(async_llm, offline_llm):
    expected = offline_llm.generate(PROMPTS, greedy(10, RequestOutputKind.FINAL_ONLY),
                                    use_tqdm=False)
    finished: list[RequestStats] = []
    async_llm.add_observer(finished.append)

    async def run() -> dict[str, str]:
        # One add for all three, as LLM.generate does: the same batches, so the same numbers.
        requests = [NewRequest(f"r{i}", p, greedy(10)) for i, p in enumerate(PROMPTS)]
        texts = {r.request_id: "" for r in requests}
        async for output in await async_llm.add_requests(requests):
            texts[output.request_id] += output.outputs[0].text
        return texts

    texts = asyncio.run(run())
    assert [texts[f"r{i}"] for i in range(3)] == [e.outputs[0].text for e in expected]
    assert async_llm.stats.max_batch_size == 3
    assert sorted(s.request_id for s in finished) == ["r0", "r1", "r2"]
    for stats, reference in zip(sorted(finished, key=lambda s: s.request_id), expected):
        assert stats.num_prompt_tokens == len(reference.prompt_token_ids)
        assert stats.num_generation_tokens == len(reference.outputs[0].token_ids)
        assert stats.finish_reason == reference.outputs[0].finish_reason
        assert stats.arrival_time <= stats.first_scheduled_time <= stats.first_token_time
        assert stats.first_token_time <= stats.finished_time


def test_bad_request_raises_before_any_output_and_adds_nothing(async_llm):
    too_long = {"prompt_token_ids": [1] * 9000}

    async def run() -> bool:
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in async_llm.generate(too_long, greedy(4), "bad"):
                pytest.fail("no output may come before the error")
        with pytest.raises(ValueError, match="max_model_len"):  # all or none
            await async_llm.add_requests([NewRequest("good", "Hi", greedy(50)),
                                          NewRequest("bad", too_long, greedy(4))])
        return await engine_is_clean(async_llm)

    assert asyncio.run(run())


def test_closing_or_cancelling_a_consumer_aborts_and_frees_blocks(async_llm):
    async def consume(tag: str, got_one: asyncio.Event) -> None:
        async for _ in async_llm.generate("Once upon a time", greedy(300, ignore_eos=True), tag):
            got_one.set()

    async def run() -> tuple[bool, bool]:
        generator = async_llm.generate("Once upon a time", greedy(300, ignore_eos=True), "closed")
        await anext(generator)
        await anext(generator)
        await generator.aclose()
        closed_clean = await engine_is_clean(async_llm)

        got_one = asyncio.Event()
        task = asyncio.create_task(consume("cancelled", got_one))
        await got_one.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return closed_clean, await engine_is_clean(async_llm)

    assert asyncio.run(run()) == (True, True)
    assert async_llm.stats.num_running == 0


def test_idle_engine_thread_sleeps(async_llm):
    async def run() -> None:
        async for _ in async_llm.generate("Hi", greedy(2), "warm"):
            pass

    asyncio.run(run())
    turns = async_llm.stats.num_loop_turns
    time.sleep(0.5)
    assert async_llm.stats.num_loop_turns == turns  # no busy spin: nothing woke it
    assert async_llm.is_running


def test_abort_all_ends_every_stream_with_a_final_output(async_llm):
    async def run():
        final_only = await async_llm.add_request(
            "whole", "Once upon a time", greedy(300, RequestOutputKind.FINAL_ONLY, ignore_eos=True))
        deltas = async_llm.generate("Hello, my name is", greedy(300, ignore_eos=True), "delta")
        first = await anext(deltas)
        async_llm.abort_all()
        rest = [output async for output in deltas]
        whole = [output async for output in final_only]
        return first, rest, whole

    first, rest, whole = asyncio.run(run())
    assert first.outputs[0].text or first.outputs[0].token_ids
    assert rest and rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert rest[-1].prompt_token_ids == first.prompt_token_ids
    # FINAL_ONLY had been told nothing yet: its one output says it was aborted.
    assert len(whole) == 1 and whole[0].finished
    assert whole[0].outputs[0].finish_reason == "abort" and whole[0].prompt_token_ids


def test_failed_step_fails_its_requests_and_the_engine_goes_on(async_llm, monkeypatch):
    engine = async_llm.engine
    real_step = engine.step

    def broken_step():
        monkeypatch.setattr(engine, "step", real_step)  # fail once only
        raise RuntimeError("injected")

    async def run() -> tuple[bool, str]:
        monkeypatch.setattr(engine, "step", broken_step)
        with pytest.raises(EngineStepError, match="injected"):
            async for _ in async_llm.generate("Hi", greedy(4), "doomed"):
                pass
        clean = await engine_is_clean(async_llm)
        text = ""
        async for output in async_llm.generate("Hi", greedy(3), "after"):
            text += output.outputs[0].text
        return clean, text

    clean, text = asyncio.run(run())
    assert clean and text and async_llm.is_running


def test_shutdown_ends_streams_and_refuses_new_requests(async_llm):
    async def run():
        stream = async_llm.generate("Once upon a time", greedy(300, ignore_eos=True), "long")
        await anext(stream)
        await asyncio.to_thread(async_llm.shutdown)
        rest = [output async for output in stream]
        with pytest.raises(EngineDeadError):
            await async_llm.add_request("late", "Hi", greedy(2))
        return rest

    rest = asyncio.run(run())
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert not async_llm.is_running


# ---- issue 16: bounded queue, honest health, errors counted ------------------------------------
def test_the_waiting_queue_is_bounded(offline_llm, monkeypatch):
    """Requests accepted but not yet scheduled are capped; a request over the cap is refused
    whole (EngineOverloadedError) and adds nothing; once the queue drains there is room."""
    engine = AsyncLLM(offline_llm.llm_engine, max_waiting_requests=2)
    # Nothing gets scheduled while the test fills the queue: the thread takes commands only.
    monkeypatch.setattr(engine.engine, "ready_to_step", lambda: False)
    try:
        async def run() -> tuple[list[str], bool]:
            first = await engine.add_request("a", "Hi", greedy(2))
            with pytest.raises(EngineOverloadedError, match="at most 2"):
                await engine.add_requests([NewRequest("b", "Hi", greedy(2)),
                                           NewRequest("c", "Hi", greedy(2))])
            monkeypatch.undo()
            engine._wake()
            texts = [o.outputs[0].text async for o in first]
            second = await engine.add_requests([NewRequest("b", "Hi", greedy(2)),
                                                NewRequest("c", "Hi", greedy(2))])
            finished = [o.request_id async for o in second if o.finished]
            return texts, sorted(finished) == ["b", "c"]

        texts, second_ran = asyncio.run(run())
        assert texts and second_ran
    finally:
        monkeypatch.undo()
        engine.shutdown()


def test_stalled_for_counts_only_while_work_waits(async_llm, monkeypatch):
    engine = async_llm.engine
    real_step = engine.step
    release = threading.Event()

    def stuck_step():
        release.wait(10)
        return real_step()

    async def run() -> tuple[float, float, float]:
        idle = async_llm.stalled_for()
        monkeypatch.setattr(engine, "step", stuck_step)
        stream = await async_llm.add_request("stuck", "Hi", greedy(2))
        await asyncio.sleep(0.6)
        stuck = async_llm.stalled_for()
        release.set()
        monkeypatch.setattr(engine, "step", real_step)
        _ = [o async for o in stream]
        await asyncio.sleep(0.1)
        return idle, stuck, async_llm.stalled_for()

    idle, stuck, after = asyncio.run(run())
    assert idle == 0 and after == 0
    assert stuck >= 0.5


def test_failed_steps_count_as_error_and_three_in_a_row_stop_the_engine(offline_llm,
                                                                       monkeypatch):
    engine = AsyncLLM(offline_llm.llm_engine)
    seen: list[RequestStats] = []
    engine.add_observer(seen.append)

    def broken_step():
        raise RuntimeError("forward failed")

    monkeypatch.setattr(engine.engine, "step", broken_step)

    async def run() -> None:
        for i in range(MAX_STEP_FAILURES):
            with pytest.raises(EngineStepError, match="forward failed"):
                _ = [o async for o in await engine.add_request(f"r{i}", "Hi", greedy(2))]
        for _ in range(100):
            if not engine.is_running:
                break
            await asyncio.sleep(0.05)

    try:
        asyncio.run(run())
        assert [s.finish_reason for s in seen] == ["error"] * MAX_STEP_FAILURES
        assert not engine.is_running  # the server's watchdog exits with status 1 on this
    finally:
        monkeypatch.undo()
        engine.shutdown()
    assert not offline_llm.llm_engine.has_unfinished_requests()


def test_prompts_are_tokenized_off_the_engine_thread(async_llm, monkeypatch):
    """A slow tokenization holds up neither the engine thread nor the event loop."""
    processor = async_llm.engine.input_processor
    real_tokenize = processor.tokenize
    threads: list[str] = []

    def slow_tokenize(prompt):
        threads.append(threading.current_thread().name)
        if prompt == "slow":
            time.sleep(1.0)
        return real_tokenize(prompt)

    monkeypatch.setattr(processor, "tokenize", slow_tokenize)

    async def run() -> tuple[int, float]:
        long_stream = await async_llm.add_request("long", "Once upon a time",
                                                  greedy(40, ignore_eos=True))
        slow = asyncio.create_task(async_llm.add_request("slow", "slow", greedy(2)))
        await asyncio.sleep(0.05)
        turns = async_llm.stats.num_loop_turns
        started = time.monotonic()
        await asyncio.sleep(0.8)  # the engine keeps stepping meanwhile
        progressed = async_llm.stats.num_loop_turns - turns
        _ = [o async for o in await slow]
        _ = [o async for o in long_stream]
        return progressed, time.monotonic() - started

    progressed, _ = asyncio.run(run())
    assert progressed >= 3
    assert set(threads) and all(name.startswith("pagedllm-input") for name in threads)


def test_the_dashboard_snapshot_is_taken_on_the_engine_thread(async_llm):
    """With the core in this process, a snapshot is a command between two steps."""
    from pagedllm.core.snapshot import CACHED, FREE, USED

    async def run():
        stream = await async_llm.add_requests(
            [NewRequest("watched", PROMPTS[1], greedy(500, ignore_eos=True))])
        async for output in stream:
            if output.outputs[0].token_ids:
                snapshot = await async_llm.snapshot()
                stream.abort()
                return snapshot
        return None

    snapshot = asyncio.run(run())
    (view,) = snapshot.requests
    assert (view.request_id, view.state) == ("watched", "running")
    assert view.num_computed_tokens >= view.num_prompt_tokens > 0
    assert {snapshot.block_states[b] for b in view.block_ids} == {USED}
    assert snapshot.num_output_tokens >= view.num_output_tokens >= 1
    free = snapshot.block_states.count(FREE) + snapshot.block_states.count(CACHED)
    assert free == snapshot.kv_cache.num_free_blocks
