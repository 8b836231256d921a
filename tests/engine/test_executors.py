"""The executor seam: the worker in this process (uni) or in a child process (mp) gives the same
tokens, and a worker that dies makes the engine raise at once instead of hanging."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from conftest import PROMPTS, make_llm

from pagedllm import LLM, SamplingParams
from pagedllm.executor import WorkerDiedError
from pagedllm.executor.multiproc import MultiprocExecutor

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def token_ids(llm: LLM, prompts: list[str], params: SamplingParams) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def mp_llm():
    return make_llm(distributed_executor_backend="mp")


def test_worker_runs_in_a_child_process(mp_llm):
    executor = mp_llm.llm_engine.engine_core.executor
    assert isinstance(executor, MultiprocExecutor)
    (pid,) = executor.worker_pids
    assert pid != os.getpid() and executor.workers[0].process.is_alive()
    with pytest.raises(AttributeError, match="other processes"):
        _ = mp_llm.llm_engine.worker


def test_mp_matches_in_process_token_for_token(mp_llm, llm):
    assert token_ids(mp_llm, PROMPTS, GREEDY) == token_ids(llm, PROMPTS, GREEDY)


def test_mp_seeded_sampling_and_logprobs_match(mp_llm, llm):
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=8, logprobs=2, n=2)
    ours, theirs = (m.generate(PROMPTS[:3], params, use_tqdm=False) for m in (mp_llm, llm))
    for a, b in zip(ours, theirs):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        first_a, first_b = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        assert first_a.keys() == first_b.keys()
        for token in first_a:
            assert first_a[token].logprob == pytest.approx(first_b[token].logprob, abs=1e-5)


def test_worker_error_is_raised_in_the_engine():
    """A bad KV budget fails in the worker; the user gets that ValueError, not a hang."""
    with pytest.raises(ValueError, match="holds no block"):
        LLM(dtype="float32", kv_cache_memory_bytes=1, distributed_executor_backend="mp")


def test_killed_worker_raises_within_seconds():
    llm = LLM(dtype="float32", kv_cache_memory_bytes=256 << 20, distributed_executor_backend="mp")
    engine = llm.llm_engine
    (pid,) = engine.engine_core.executor.worker_pids
    killed_at: list[float] = []

    def kill_soon() -> None:
        while engine.num_steps < 3:  # mid-run: the engine has started stepping
            time.sleep(0.01)
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    with pytest.raises(WorkerDiedError, match=f"worker process {pid}"):
        llm.generate(PROMPTS[:4], SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True),
                     use_tqdm=False)
    raised_after = time.monotonic() - killed_at[0]
    killer.join()
    assert raised_after < 5
    with pytest.raises(WorkerDiedError):  # and it stays dead: no silent hang on the next call
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    engine.shutdown()


def test_offline_engine_with_its_core_in_another_process(llm):
    """LLM(engine_core_process=True): the offline loop waits on the core process's steps."""
    other = LLM(dtype="float32", kv_cache_memory_bytes=256 << 20, engine_core_process=True)
    core = other.llm_engine.engine_core
    assert core.pid != os.getpid()
    try:
        assert token_ids(other, PROMPTS, GREEDY) == token_ids(llm, PROMPTS, GREEDY)
        stopped = other.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=30,
                                                             stop=[","]), use_tqdm=False)
        assert all("," not in o.outputs[0].text for o in stopped)
        assert not other.llm_engine.has_unfinished_requests()
    finally:
        other.llm_engine.shutdown()
    assert not core.process.is_alive()
