"""The engine's CUDA path on a real GPU (skipped without one): the memory plan, the captured
decode graphs against eager runs, eager fallback, and pinned swap memory."""

from __future__ import annotations

import gc

import pytest
import torch

from pagedllm import LLM, SamplingParams, TokensPrompt
from pagedllm.core.step_io import ScheduledRequest
from pagedllm.worker.cuda_graph import capture_sizes
from pagedllm.worker.swap import SwapSpace

from .helpers import VOCAB_SIZE, sharpen, write_config_only_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MAX_NUM_SEQS = 16


class CountingGraph:
    """Delegates to a captured graph and counts its replays."""

    def __init__(self, graph) -> None:
        self.graph, self.replays = graph, 0

    def replay(self) -> None:
        self.replays += 1
        self.graph.replay()


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = write_config_only_model(tmp_path_factory.mktemp("tiny"))
    llm = LLM(model=str(folder), load_format="dummy", device="cuda", dtype="float32",
              gpu_memory_utilization=0.25, max_num_seqs=MAX_NUM_SEQS, block_size=16,
              enable_prefix_caching=False)  # the tests below write into free blocks directly
    sharpen(llm.llm_engine.worker.runner.model)  # in place: the graphs read the same tensors
    yield llm
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def test_memory_plan_and_capture(llm):
    engine = llm.llm_engine
    plan = engine.worker.memory_plan
    assert plan is not None and plan.weights > 0 and plan.activations > 0
    assert plan.cuda_graphs > 0 and plan.kv_cache > 0
    assert engine.cache_config.num_blocks == plan.kv_cache // engine.worker.kv_shape.bytes_per_block
    assert engine.worker.cuda_graph_sizes == capture_sizes(MAX_NUM_SEQS, 2048) == [1, 2, 4, 8, 16]
    assert sorted(engine.worker.runner.decode_graphs.graphs) == engine.worker.cuda_graph_sizes
    assert engine.worker.cuda_graph_capture_s > 0


def request(i: int, tokens: list[int], start: int) -> ScheduledRequest:
    blocks = [10 + 4 * i + b for b in range(4)]  # private blocks, far from the engine's use
    prompt = [(3 * i + p) % VOCAB_SIZE for p in range(start + len(tokens))]
    return ScheduledRequest(f"r{i}", tokens, start, blocks, SamplingParams(), [], prompt, True,
                            [f"r{i}"])


@pytest.mark.parametrize("num_decodes", [1, 3, 9, 16, 20])
def test_graph_replay_matches_eager(llm, num_decodes):
    runner = llm.llm_engine.worker.runner
    prompt_lens = [5 + 3 * i for i in range(num_decodes)]  # at most 63 tokens: 4 blocks
    prefills = [request(i, [(i + p) % VOCAB_SIZE for p in range(n)], 0)
                for i, n in enumerate(prompt_lens)]
    with torch.inference_mode():
        runner.forward(runner.prepare_inputs(prefills))
        step = runner.prepare_inputs([request(i, [7], n) for i, n in enumerate(prompt_lens)])
        size = runner.decode_graphs.size_for(step.metadata)
        assert size == (None if num_decodes > MAX_NUM_SEQS else
                        min(s for s in llm.llm_engine.worker.cuda_graph_sizes if s >= num_decodes))
        graphed = runner.forward(step).clone()
        eager = runner.model(step.input_ids, step.positions, runner.kv_caches, step.metadata)
    torch.cuda.synchronize()
    assert graphed.shape == eager.shape == (num_decodes, 64)
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)


def test_generate_replays_graphs(llm):
    runner = llm.llm_engine.worker.runner
    graphs = runner.decode_graphs
    counters = {size: CountingGraph(g) for size, g in graphs.graphs.items()}
    graphs.graphs.update(counters)
    try:
        prompts = [TokensPrompt(prompt_token_ids=[(5 * i + j) % VOCAB_SIZE for j in range(4 + i)])
                   for i in range(12)]
        params = [SamplingParams(max_tokens=3 + i, ignore_eos=True, detokenize=False, logprobs=1)
                  for i in range(12)]
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        graphs.graphs.update({size: c.graph for size, c in counters.items()})
    for i, output in enumerate(outputs):
        completion = output.outputs[0]
        assert len(completion.token_ids) == 3 + i
        assert all(torch.isfinite(torch.tensor([p.logprob for p in lp.values()])).all()
                   for lp in completion.logprobs)
    assert sum(c.replays for c in counters.values()) > 0


def test_enforce_eager_captures_nothing(tmp_path):
    folder = write_config_only_model(tmp_path / "tiny")
    llm = LLM(model=str(folder), load_format="dummy", device="cuda", dtype="float32",
              kv_cache_memory_bytes=16 << 20, enforce_eager=True)
    engine = llm.llm_engine
    assert engine.worker.cuda_graph_sizes == [] and engine.worker.runner.decode_graphs is None
    assert engine.worker.memory_plan is None  # an explicit KV budget skips the profile
    out = llm.generate(TokensPrompt(prompt_token_ids=[1, 2, 3]),
                       SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_swap_space_is_pinned_and_round_trips(llm):
    kv_caches = llm.llm_engine.worker.runner.kv_caches
    swap = SwapSpace(kv_caches, 2)
    assert swap.host.is_pinned()
    key_cache, value_cache = kv_caches[0]
    saved = key_cache[3].clone(), value_cache[3].clone()
    key_cache[3].normal_()
    value_cache[3].normal_()
    written = key_cache[3].clone(), value_cache[3].clone()
    swap.swap_out([(3, 1)])
    key_cache[3].zero_()
    value_cache[3].zero_()
    swap.swap_in([(1, 3)])
    torch.cuda.synchronize()
    assert torch.equal(key_cache[3], written[0]) and torch.equal(value_cache[3], written[1])
    key_cache[3].copy_(saved[0])
    value_cache[3].copy_(saved[1])
