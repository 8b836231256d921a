"""End to end with kv_cache_dtype="fp8": the default model's greedy tokens against a float32 KV
cache, twice the tokens in the same memory, scales from the first prompts or the checkpoint,
and swap preemption and copy-on-write on fp8 blocks.

An fp8 cache is not compared token for token across different schedules: a K value that differs
by one float32 ulp between batch shapes can round to the neighbouring fp8 code, 6% away, and
that flips this small model's near-ties. Block moves are checked byte for byte instead."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import PROMPTS, make_llm, worker_of
from safetensors.torch import load_file, save_file

from pagedllm import LLM, SamplingParams
from pagedllm.attention.kv_quant import KVScales
from pagedllm.config import EngineArgs
from pagedllm.worker.kv_cache import KVCacheShape
from pagedllm.worker.model_runner import ModelRunner
from pagedllm.worker.swap import SwapSpace

BLOCK_BYTES_FP8 = 737280 // 4  # one 16-token block of the bundled model with fp8 K/V


def layer_scales(engine_llm: LLM) -> list[KVScales]:
    return [layer.self_attn.kv_scales for layer in worker_of(engine_llm).model.model.layers]


def teacher_forced(engine_llm: LLM, sequences: list[dict]) -> list[dict[int, float]]:
    """Per sequence, at each position the top-1 token and the logprob of the token there."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    rows = []
    for out in engine_llm.generate(sequences, params, use_tqdm=False):
        ids = out.prompt_token_ids
        rows.append([(max(lp.items(), key=lambda kv: kv[1].logprob)[0], lp[token].logprob)
                     for token, lp in zip(ids[1:], out.prompt_logprobs[1:])])
    return rows


def test_fp8_greedy_agrees_with_float32_cache(llm, capsys):
    """The issue's check, teacher-forced: the float32-cache engine writes 64 greedy tokens for
    each of 8 prompts; both engines then read prompt + those tokens, and at every generated
    position the fp8 engine's top-1 must be the float32 engine's on at least 90% of them. (Run
    free, one early near-tie flip changes every later context: on this model even a bf16 engine
    keeps only about half of 64 free-running tokens, see docs/quantization.md.) The mean
    |difference| of the logprobs of the tokens there is reported."""
    fp8 = make_llm(kv_cache_dtype="fp8")
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    generated = llm.generate(PROMPTS[:8], params, use_tqdm=False)
    sequences = [{"prompt_token_ids": [*o.prompt_token_ids, *o.outputs[0].token_ids]}
                 for o in generated]
    same, gaps, total = 0, [], 0
    for out, want, have in zip(generated, teacher_forced(llm, sequences),
                               teacher_forced(fp8, sequences)):
        n = len(out.outputs[0].token_ids)
        for (top_a, logprob_a), (top_b, logprob_b) in zip(want[-n:], have[-n:]):
            same += top_a == top_b
            gaps.append(abs(logprob_a - logprob_b))
        total += n
    agreement, mean_gap = same / total, sum(gaps) / len(gaps)
    with capsys.disabled():
        print(f"\nfp8 KV cache: top-1 agrees with float32 on {agreement:.1%} of {total} generated "
              f"positions; mean |logprob difference| {mean_gap:.4f}")
    assert total == 8 * 64
    assert agreement >= 0.9
    assert mean_gap < 0.1


def test_fp8_plan_holds_twice_a_bf16_cache_and_four_times_float32():
    shape = dict(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16)
    fp8 = KVCacheShape(dtype=torch.float8_e4m3fn, **shape).bytes_per_block
    assert KVCacheShape(dtype=torch.bfloat16, **shape).bytes_per_block == 2 * fp8
    assert KVCacheShape(dtype=torch.float32, **shape).bytes_per_block == 4 * fp8
    engine = make_llm(kv_cache_dtype="fp8").llm_engine
    assert engine.cache_config.bytes_per_block == BLOCK_BYTES_FP8
    assert engine.cache_config.num_blocks == (256 << 20) // BLOCK_BYTES_FP8


def test_calculate_kv_scales_sets_every_layer_from_the_first_prompts(llm):
    calculated = make_llm(kv_cache_dtype="fp8", calculate_kv_scales=True)
    params = SamplingParams(temperature=0, max_tokens=24)
    got = calculated.generate(PROMPTS[:4], params, use_tqdm=False)
    scales = layer_scales(calculated)
    assert all(s.k_scale != 1.0 and s.v_scale != 1.0 for s in scales)
    assert not any(s.calculate for s in scales)
    assert len({s.k_scale for s in scales}) > 1  # per layer, not one global value
    expected = llm.generate(PROMPTS[:4], params, use_tqdm=False)
    same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(expected, got))
    assert same >= 3


@pytest.mark.parametrize("cache_type", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_swap_and_copy_on_write_move_fp8_blocks_byte_for_byte(cache_type):
    pools = [tuple(torch.randn(6, 16, 2, 8).to(cache_type) for _ in range(2)) for _ in range(3)]
    before = [tuple(c.clone() for c in layer) for layer in pools]
    swap = SwapSpace(pools, num_blocks=4)
    swap.swap_out([(1, 0), (4, 3)])
    for layer in pools:  # the device blocks are reused by someone else meanwhile
        for cache in layer:
            cache.view(torch.uint8)[[1, 4]] = 0
    swap.swap_in([(0, 2), (3, 5)])
    runner = SimpleNamespace(kv_caches=pools, draft=None, _tensor=lambda ids: torch.tensor(ids))
    ModelRunner.copy_blocks(runner, [(5, 0)])  # copy-on-write of a shared block
    for layer, old in zip(pools, before):
        for cache, original in zip(layer, old):
            raw, want = cache.view(torch.uint8), original.view(torch.uint8)
            assert torch.equal(raw[2], want[1]) and torch.equal(raw[5], want[4])
            assert torch.equal(raw[0], want[4])


def test_fp8_engine_under_swap_preemption_finishes_everything():
    """Tight memory with swap preemption: every request finishes with all its tokens, blocks
    go out and come back, and n=2 greedy forks (sharing their prompt blocks copy-on-write)
    agree with each other."""
    tight = make_llm(kv_cache_dtype="fp8", kv_cache_memory_bytes=8 * BLOCK_BYTES_FP8,
                     preemption_mode="swap", swap_space=0.02)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    got = tight.generate(PROMPTS, greedy, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 16 for o in got)
    stats = tight.llm_engine.kv_cache_stats()
    assert stats.num_swap_outs > 0 and stats.num_swap_ins == stats.num_swap_outs
    forks = make_llm(kv_cache_dtype="fp8").generate(
        PROMPTS[:2], SamplingParams(temperature=1.0, top_k=1, max_tokens=16, n=2),
        use_tqdm=False)  # top_k=1: sampling that always picks the argmax
    for fork in forks:
        assert fork.outputs[0].token_ids == fork.outputs[1].token_ids


@pytest.fixture(scope="module")
def folder_with_kv_scales(reference_dir, tmp_path_factory):
    """The default model's HF folder plus llm-compressor-style self_attn.k_scale / v_scale."""
    folder = tmp_path_factory.mktemp("kv_scales")
    for item in reference_dir.iterdir():
        if item.suffix != ".safetensors":
            (folder / item.name).symlink_to(item)
    config = json.loads((reference_dir / "config.json").read_text())
    tensors = {}
    for file in reference_dir.glob("*.safetensors"):
        tensors |= load_file(file)
    for layer in range(config["num_hidden_layers"]):
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(0.05 + layer / 1000)
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor([0.02])
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_checkpoint_kv_scales_are_read(folder_with_kv_scales):
    engine_llm = LLM(str(folder_with_kv_scales), dtype="float32", kv_cache_dtype="fp8",
                     kv_cache_memory_bytes=64 << 20)
    scales = layer_scales(engine_llm)
    assert scales[0].k_scale == pytest.approx(0.05) and scales[7].k_scale == pytest.approx(0.057)
    assert all(s.v_scale == pytest.approx(0.02) for s in scales)
    out = engine_llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=8),
                              use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) > 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(kv_cache_dtype="int8"), "kv_cache_dtype must be one of"),
    (dict(kv_cache_dtype="fp8", quantization="int3"), "quantization must be one of"),
    (dict(calculate_kv_scales=True), "calculate_kv_scales needs an fp8 KV cache"),
])
def test_bad_kv_options_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**kwargs)
