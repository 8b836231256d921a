"""The ray executor on a local Ray cluster of 2 CPUs, started once for the module: the engine
joins it (it starts no cluster of its own), its two actors give exactly the tokens of the mp
executor and of one rank, errors come back as the worker's own, a killed actor raises at once,
and shutdown leaves no actor and no reserved CPU behind."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # entrypoints/server_utils.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))  # tiny_models.py

from entrypoints.server_utils import (  # noqa: E402
    DEAD_ENGINE_EXIT_S,
    engine_state,
    killed_at_exit,
    launch_server,
    stream_until_killed,
)
from test_tensor_parallel import TINY, assert_same_outputs, generate, stats_of  # noqa: E402
from test_tp_server import MAX_TOKENS, PROMPT, SERVE, alive  # noqa: E402
from test_tp_server import folder as served_model  # noqa: E402, F401 (a fixture, by this name)
from tiny_models import save_tiny_model, tiny_engine  # noqa: E402

from pagedllm import LLM, SamplingParams, TokensPrompt  # noqa: E402
from pagedllm.config import EngineArgs  # noqa: E402
from pagedllm.executor import WorkerDiedError  # noqa: E402
from pagedllm.executor.ray_executor import RayExecutor  # noqa: E402

ray = pytest.importorskip("ray")

CLUSTER_CPUS = 2


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """One local cluster for the module (starting Ray takes seconds); every engine here must
    join it rather than start its own."""
    ray.init(num_cpus=CLUSTER_CPUS, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    save_tiny_model(LlamaConfig(**TINY, tie_word_embeddings=False), folder)
    return folder


def ray_engine(folder: Path, **overrides) -> LLM:
    """tiny_engine's settings under the ray executor, never cached: each test shuts its Ray
    engine down, since the actors hold the cluster's CPUs."""
    settings = dict(model=str(folder), dtype="float32", skip_tokenizer_init=True,
                    kv_cache_memory_bytes=4 << 20, enable_prefix_caching=True,
                    max_num_batched_tokens=16, distributed_executor_backend="ray")
    return LLM(**(settings | overrides))


def executor_of(llm: LLM) -> RayExecutor:
    return llm.llm_engine.engine_core.executor


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def all_cpus_free() -> bool:
    return ray.available_resources().get("CPU", 0) == CLUSTER_CPUS


def assert_released(pids: list[int]) -> None:
    """No actor process left, every bundle given back, and the module's cluster still up."""
    assert wait_until(lambda: not any(alive(pid) for pid in pids)), "an actor survived"
    assert wait_until(all_cpus_free), ray.available_resources()
    assert ray.is_initialized()


def test_two_actors_equal_mp_and_one_rank(llama):
    reference = generate(tiny_engine(llama))
    mp = tiny_engine(llama, tensor_parallel_size=2, distributed_executor_backend="mp")
    try:
        mp_outputs = generate(mp)
    finally:
        mp.llm_engine.shutdown()
    llm = ray_engine(llama, tensor_parallel_size=2)
    executor = executor_of(llm)
    pids = executor.worker_pids
    try:
        assert isinstance(executor, RayExecutor) and not executor.started_ray
        assert len(set(pids)) == 2 and os.getpid() not in pids
        outputs = generate(llm)
        assert_same_outputs(outputs, reference)
        assert_same_outputs(outputs, mp_outputs)
        assert [r["tp_rank"] for r in stats_of(llm)] == [0, 1]
        assert ray.available_resources().get("CPU", 0) == 0  # both bundles held
    finally:
        llm.llm_engine.shutdown()
    assert_released(pids)
    llm.llm_engine.shutdown()  # a second shutdown does nothing


def test_two_pipeline_stages_on_ray(llama):
    """Two stages as two actors: one rank's tokens, and the steps overlap as under mp (the
    actors take the calls in the order they were sent)."""
    reference = generate(tiny_engine(llama))
    llm = ray_engine(llama, pipeline_parallel_size=2)
    pids = executor_of(llm).worker_pids
    try:
        assert_same_outputs(generate(llm), reference)
        assert [r["stage"] for r in stats_of(llm)] == [0, 1]
    finally:
        llm.llm_engine.shutdown()
    assert_released(pids)


def test_one_rank_runs_in_one_actor(llama):
    prompts = [[5, 17, 99, 3]]
    reference = generate(tiny_engine(llama), prompts)
    llm = ray_engine(llama)
    try:
        (pid,) = executor_of(llm).worker_pids
        assert pid != os.getpid()
        assert_same_outputs(generate(llm, prompts), reference)
    finally:
        llm.llm_engine.shutdown()
    assert_released([pid])


def test_worker_error_is_the_worker_s_own(tmp_path):
    """Three heads do not split over two ranks: the ValueError both actors raise reaches the
    user as itself (test_sharding.py checks the same message without Ray), and the bundles go
    back to the cluster. (Two ranks, not 3 of 4 heads: the module's cluster has 2 CPUs.)"""
    save_tiny_model(LlamaConfig(**{**TINY, "hidden_size": 48, "num_attention_heads": 3,
                                   "num_key_value_heads": 1}), tmp_path)
    with pytest.raises(ValueError, match="tensor_parallel_size 2 does not divide the 3 "
                                         "attention heads"):
        ray_engine(tmp_path, tensor_parallel_size=2)
    assert wait_until(all_cpus_free), ray.available_resources()


def test_more_ranks_than_the_cluster_holds(llama):
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"could not place 3 ranks .* 2 CPU free of 2"):
        ray_engine(llama, tensor_parallel_size=3, distributed_timeout=1)
    assert time.monotonic() - started < 30
    assert wait_until(all_cpus_free), ray.available_resources()


def test_killed_actor_raises_within_seconds(llama):
    llm = ray_engine(llama, tensor_parallel_size=2)
    engine = llm.llm_engine
    pids = executor_of(llm).worker_pids
    killed_at: list[float] = []

    def kill_soon() -> None:
        while engine.num_steps < 3:  # mid-run: the engine has started stepping
            time.sleep(0.01)
        killed_at.append(time.monotonic())
        os.kill(pids[1], signal.SIGKILL)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=[i, 7, 9]) for i in range(1, 5)]
    with pytest.raises(WorkerDiedError, match=f"worker process {pids[1]} \\(rank 1"):
        llm.generate(prompts, params, use_tqdm=False)
    raised_after = time.monotonic() - killed_at[0]
    killer.join()
    assert raised_after < 5
    with pytest.raises(WorkerDiedError):  # and it stays dead: no silent hang on the next call
        llm.generate(prompts[:1], params, use_tqdm=False)
    # the death released everything at once: rank 0, stuck in a collective, is gone too
    assert_released(pids)
    engine.shutdown()


ON_RAY = ("--distributed-executor-backend", "ray")


@pytest.mark.slow
def test_server_on_ray(served_model, tmp_path):  # noqa: F811 (the fixture imported above)
    """`pagedllm serve -tp 2 --distributed-executor-backend ray`: its engine core process finds
    the module's cluster by itself, /debug/step_stats lists the actors' pids, the text is one
    rank's, and SIGTERM leaves no actor behind."""
    one_rank = LLM(str(served_model), dtype="float32", kv_cache_memory_bytes=64 << 20)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = one_rank.generate([PROMPT], greedy, use_tqdm=False)[0].outputs[0].text
    with killed_at_exit(launch_server(tmp_path, str(served_model), *SERVE, *ON_RAY)) as server:
        server.wait_until_healthy()
        with httpx.Client(base_url=server.url, timeout=60) as http:
            workers = engine_state(http)["worker_pids"]
            body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "ignore_eos": True}
            completion = http.post("/v1/completions", json=body).json()
        assert len(workers) == 2 and all(alive(pid) for pid in workers)
        assert completion["choices"][0]["text"] == expected
        assert server.stop(signal.SIGTERM) == 0, server.log_tail()
        assert_released(workers)


@pytest.mark.slow
def test_a_killed_actor_ends_the_server(served_model, tmp_path):  # noqa: F811 (as above)
    """SIGKILL rank 1's actor during a stream: the stream ends with an engine error, the
    server exits non-zero within seconds, and rank 0's actor goes too."""
    with killed_at_exit(launch_server(tmp_path, str(served_model), *SERVE, *ON_RAY)) as server:
        server.wait_until_healthy()
        with httpx.Client(base_url=server.url, timeout=60) as http:
            workers = engine_state(http)["worker_pids"]
        events = stream_until_killed(server, workers[1])
        assert '"engine_error"' in events[-2], events[-3:]
        assert server.proc.wait(DEAD_ENGINE_EXIT_S) != 0, server.log_tail()
        assert_released(workers)


def test_options():
    assert EngineArgs(distributed_executor_backend="ray").world_size == 1
    with pytest.raises(ValueError, match="need 'mp' or 'ray'"):
        EngineArgs(tensor_parallel_size=2, distributed_executor_backend="uni")


def test_missing_ray_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ValueError, match=r"pip install 'pagedllm\[ray\]'"):
        EngineArgs(tensor_parallel_size=2, distributed_executor_backend="ray")
