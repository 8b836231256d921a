"""Shared fixtures: engines built once per configuration, and a transformers reference.

Every end-to-end test ends with the same invariant checked: no request left in flight and every
KV block back in the free queue.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernel tests run in Triton's interpreter. Triton reads the switch when
# @triton.jit wraps a function, and wraps its own library (tl.sum, tl.zeros...) as soon as triton
# is imported, which the next line already does (transformers -> torch._dynamo): so it goes here.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from pagedllm import LLM
from pagedllm.model.source import default_model_path
from pagedllm.ops.cpu import cpu_ops
from pagedllm.platform.cpu import ISA_ENV, ISA_LEVELS, cpu_info

_ENGINES: dict[tuple, LLM] = {}

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "In a shocking finding, scientists discovered a herd of unicorns living in a remote, "
    "previously unexplored valley in the Andes Mountains. Even more surprising to the "
    "researchers was the fact that the unicorns spoke perfect English.",
    "def fibonacci(n):",
    "List three colors:",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. "
    "Once upon a time, in a land far, far away, there lived a",
    "Q: What is 12 times 7?\nA:",
    "Translate to French: 'I love reading books in the garden on sunny afternoons.'",
]


# PAGEDLLM_TEST_EXECUTOR=mp runs every test engine's worker in a child process (MultiprocExecutor)
TEST_EXECUTOR = os.environ.get("PAGEDLLM_TEST_EXECUTOR", "uni")


def make_llm(**kwargs) -> LLM:
    """One engine per distinct configuration for the whole session (start-up costs seconds)."""
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("distributed_executor_backend", TEST_EXECUTOR)
    kwargs.setdefault("kv_cache_memory_bytes", 256 << 20)
    key = (*sorted(kwargs.items()), cpu_info().isa)  # a forced kernel level builds its own
    if key not in _ENGINES:
        _ENGINES[key] = LLM(**kwargs)
    return _ENGINES[key]


def worker_of(engine_llm: LLM):
    """The engine's worker object, for tests that look inside the model or the runner; such a
    test skips when the worker runs in another process (PAGEDLLM_TEST_EXECUTOR=mp)."""
    if engine_llm.llm_engine.args.distributed_executor_backend != "uni":
        pytest.skip("looks inside the worker, which runs in another process here")
    return engine_llm.llm_engine.worker


def skip_unless_cpu_runs(level: str) -> None:
    if not cpu_info().can_run(level):
        pytest.skip(f"this CPU ({cpu_info().native_isa}) cannot execute {level} code")


@pytest.fixture(scope="session", params=ISA_LEVELS)
def ops(request):
    """The C++ kernels built for each level this CPU executes (the others skip, with why)."""
    skip_unless_cpu_runs(request.param)
    module = cpu_ops(request.param)
    if module is None:
        pytest.skip("the C++ kernels cannot be built on this machine")
    assert module.level == request.param
    return module


@pytest.fixture
def force_cpu_isa(monkeypatch):
    """force_cpu_isa(level): the probe reports `level` until the test ends, as
    PAGEDLLM_CPU_ISA=level would (below avx512 that also means no oneDNN bf16)."""

    def force(level: str) -> None:
        skip_unless_cpu_runs(level)
        monkeypatch.setenv(ISA_ENV, level)
        cpu_info.cache_clear()

    yield force
    monkeypatch.undo()
    cpu_info.cache_clear()


@pytest.fixture(scope="session")
def llm() -> LLM:
    return make_llm()


@pytest.fixture(autouse=True)
def _all_blocks_free_after_each_test():
    yield
    for engine_llm in _ENGINES.values():
        assert_idle_and_free(engine_llm)


def assert_idle_and_free(engine_llm: LLM) -> None:
    engine = engine_llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.engine_core.block_pool.num_free_blocks == engine.engine_core.block_pool.num_blocks
    assert all(block.ref_cnt == 0 for block in engine.engine_core.block_pool.blocks)
    assert not engine.output_processor.states
    assert not engine.engine_core.structured_output.active  # no grammar matcher outlives its request


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The default model as an HF folder (safetensors + tokenizer), written by transformers'
    own GGUF loader once and cached on disk: the independent reference for our loaders."""
    from pagedllm.bench.throughput import dense_hf_folder

    return dense_hf_folder(default_model_path())


@pytest.fixture(scope="session")
def hf_model(reference_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_greedy(hf_model, llm):
    """transformers' greedy continuation of each prompt, one at a time (no padding)."""
    tokenizer = llm.get_tokenizer()
    cache: dict[tuple[str, int], list[int]] = {}

    def generate(prompt: str, max_new_tokens: int) -> list[int]:
        key = (prompt, max_new_tokens)
        if key not in cache:
            ids = torch.tensor([tokenizer.encode(prompt)])
            with torch.inference_mode():
                out = hf_model.generate(ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=max_new_tokens, do_sample=False)
            cache[key] = out[0, ids.shape[1]:].tolist()
        return cache[key]

    return generate
