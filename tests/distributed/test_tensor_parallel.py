"""Tensor parallelism on 2 ranks (two worker processes on gloo) against one rank, on tiny random
models of every family: the same greedy tokens, logprobs within 1e-3, with prefix caching and
chunked prefill on (a 16-token step budget splits the longer prompts)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))  # tiny_models.py

from tiny_models import save_tiny_model, tiny_engine  # noqa: E402

from pagedllm import SamplingParams, TokensPrompt  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
GEMMA = dict(TINY, head_dim=32, num_hidden_layers=4, sliding_window=8, query_pre_attn_scalar=24,
             layer_types=["sliding_attention", "sliding_attention", "full_attention",
                          "sliding_attention"])
OPT = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
           vocab_size=512, max_position_embeddings=256)
FAMILIES = {
    "llama": lambda: LlamaConfig(**TINY, tie_word_embeddings=False),
    # one KV head for two ranks: each rank keeps a copy of it
    "llama-tied-one-kv-head": lambda: LlamaConfig(**{**TINY, "num_key_value_heads": 1},
                                                  tie_word_embeddings=True),
    "mistral-window": lambda: MistralConfig(**TINY, sliding_window=8),
    "qwen2-bias": lambda: Qwen2Config(**TINY, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False),
    "phi3-fused-checkpoint": lambda: Phi3Config(**TINY, bos_token_id=1, eos_token_id=2,
                                                pad_token_id=0),
    "gemma": lambda: GemmaConfig(**{**TINY, "head_dim": 32}),
    "gemma2": lambda: Gemma2Config(**GEMMA, attn_logit_softcapping=1.0,
                                   final_logit_softcapping=2.0),
    "gemma3": lambda: Gemma3TextConfig(**GEMMA, rope_local_base_freq=100.0),
    # 515 rows: the vocabulary does not split evenly, the second rank's tail is padding
    "gpt2-odd-vocab": lambda: GPT2Config(n_embd=64, n_inner=128, n_layer=2, n_head=4,
                                         vocab_size=515, n_positions=256),
    "opt-350m-like": lambda: OPTConfig(**OPT, word_embed_proj_dim=32,
                                       do_layer_norm_before=False),
}
PROMPTS = [[5, 17, 99, 3], [250, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [42] * 30,
           [(37 * i + 11) % 509 for i in range(40)]]
MAX_TOKENS = 8


def generate(llm, prompts=PROMPTS):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            detokenize=False, logprobs=2)
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)


def assert_same_outputs(ours, reference, atol: float = 1e-3) -> None:
    for a, b in zip(ours, reference, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert step_a.keys() == step_b.keys()
            for token, entry in step_a.items():
                assert entry.logprob == pytest.approx(step_b[token].logprob, abs=atol)


# variants another one covers already (GQA, windows, biases, Gemma's conventions): run by
# `make test-all`, kept out of the default suite's time
COVERED = {"llama", "mistral-window", "qwen2-bias", "gemma"}


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in COVERED
                                    else f for f in FAMILIES])
def test_two_ranks_equal_one(family, tmp_path):
    save_tiny_model(FAMILIES[family](), tmp_path)
    one_rank = tiny_engine(tmp_path)
    reference = generate(one_rank)
    llm = tiny_engine(tmp_path, tensor_parallel_size=2, distributed_executor_backend="mp")
    try:
        assert_same_outputs(generate(llm), reference)
        # each rank holds about half the weights (norms and positions are copied) and ran
        # its collectives; the step ran on both
        (whole,) = stats_of(one_rank)
        ranks = stats_of(llm)
        assert [r["tp_rank"] for r in ranks] == [0, 1]
        assert all(r["weight_bytes"] < 0.75 * whole["weight_bytes"] for r in ranks)
        assert all(r["collective_calls"] > 0 for r in ranks)
    finally:
        llm.llm_engine.shutdown()


def stats_of(llm) -> list[dict]:
    return llm.llm_engine.engine_core.executor.collective_rpc("parallel_stats")


def test_default_model_on_three_ranks():
    """The bundled SmolLM2-135M (9 heads, 3 KV heads) on 3 ranks, its GGUF weights dequantized
    for the split, equals one rank on the same dequantized weights."""
    from pagedllm import LLM

    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=2)
    one = LLM(dtype="float32", quantization="none", kv_cache_memory_bytes=64 << 20)
    reference = one.generate(prompts, params, use_tqdm=False)
    three = LLM(dtype="float32", tensor_parallel_size=3, kv_cache_memory_bytes=64 << 20)
    try:
        assert_same_outputs(three.generate(prompts, params, use_tqdm=False), reference)
        assert [r["kv_heads"] for r in stats_of(three)] == [1, 1, 1]
    finally:
        three.llm_engine.shutdown()


@pytest.mark.parametrize("family,tp,pp", [
    ("gpt2-odd-vocab", 1, 2),
    ("llama-tied-one-kv-head", 2, 2),
    *(pytest.param(family, tp, pp, marks=pytest.mark.slow) for family, tp, pp in (
        ("llama", 1, 2), ("llama-tied-one-kv-head", 1, 2), ("llama", 2, 2),
        ("gpt2-odd-vocab", 2, 2))),
])
def test_pipeline_stages_equal_one_rank(family, tp, pp, tmp_path):
    """Two stages (layer 0 on the first, layer 1 and the head on the second), alone and with two
    tensor-parallel ranks each (4 processes), give one rank's tokens and logprobs."""
    save_tiny_model(FAMILIES[family](), tmp_path)
    reference = generate(tiny_engine(tmp_path))
    llm = tiny_engine(tmp_path, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                      distributed_executor_backend="mp")
    try:
        assert_same_outputs(generate(llm), reference)
        ranks = stats_of(llm)
        assert [(r["stage"], r["tp_rank"]) for r in ranks] == [
            (stage, rank) for stage in range(pp) for rank in range(tp)]
        assert all(r["kv_layers"] == 1 for r in ranks)
    finally:
        llm.llm_engine.shutdown()


def test_pipeline_keeps_a_step_per_stage_in_flight(tmp_path):
    """Two stages overlap consecutive steps: the core submits step k + 1 (other requests)
    before step k's tokens come back, so consecutive decode steps share no request, where one
    rank's decode steps each hold every running request."""
    save_tiny_model(LlamaConfig(**{**TINY, "num_hidden_layers": 4}), tmp_path)
    prompts = [[(7 * i + j) % 500 for j in range(5 + i)] for i in range(12)]
    reference = generate(tiny_engine(tmp_path), prompts)
    llm = tiny_engine(tmp_path, pipeline_parallel_size=2, distributed_executor_backend="mp",
                      max_num_batched_tokens=64)
    try:
        first = llm.llm_engine.num_steps
        assert_same_outputs(generate(llm, prompts), reference)
        steps = [set(r.scheduled) for r in llm.llm_engine.step_records if r.step > first]
        decodes = steps[-8:]  # every request decoding by then
        assert all(not (a & b) for a, b in zip(decodes, decodes[1:]))
        assert all(0 < len(s) < len(prompts) for s in decodes)
    finally:
        llm.llm_engine.shutdown()


def test_default_model_on_two_stages_kept_quantized():
    """The bundled GGUF, kept in its quantized blocks (stages split layers, not matrices), on
    two stages of 15 layers each gives exactly one rank's tokens and logprobs."""
    from pagedllm import LLM

    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=2)
    reference = LLM(kv_cache_memory_bytes=64 << 20).generate(prompts, params, use_tqdm=False)
    two = LLM(kv_cache_memory_bytes=64 << 20, pipeline_parallel_size=2)
    try:
        assert_same_outputs(two.generate(prompts, params, use_tqdm=False), reference, atol=0)
        assert [r["kv_layers"] for r in stats_of(two)] == [15, 15]
    finally:
        two.llm_engine.shutdown()
