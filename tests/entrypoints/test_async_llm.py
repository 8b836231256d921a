"""AsyncLLM around the session's offline engine: batching, validation, aborts, idling, shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from pagedllm import RequestOutputKind, SamplingParams
from pagedllm.engine.async_llm import (
    AsyncLLM,
    EngineDeadError,
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
